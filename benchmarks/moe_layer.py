"""One MoE layer, forward + backward, next to the layers people compare it with.

    python benchmarks/moe_layer.py                 # 4096 tokens, dim 512, 16 experts, top-1, hidden 1024
    python benchmarks/moe_layer.py --tokens 8192 --reps 10

Rows, all measured in this process on the same input (median of --reps after a warm-up):
  herd MoE               token-sparse routed experts (one grouped matmul) + shared expert
  dense SwiGLU           hidden 2 x expert_hidden: the MoE layer's active parameters as one MLP
  transformers           Llama4TextMoe: every expert computes every token, zeros where not routed
  deepspeed              deepspeed.moe.layer.MoE (GShard-style dispatch), no token dropped, plus the
                         same shared expert
  herd EP=1 / EP=2       the herd layer on 2 gloo ranks (1 thread each), half the tokens per rank;
                         EP=2 splits the experts and moves tokens by all-to-all
No asserts: it prints a table.
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import torch.nn.functional as F
from torch import nn

from model import ModelArgs, MoE
from model.layers import FeedForward


def make_args(a) -> ModelArgs:
    return ModelArgs(dim=a.dim, expert_hidden=a.hidden, n_experts=a.experts, top_k=a.top_k, n_layers=1,
                     n_heads=8, n_kv_heads=8)


def init_(module: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return module


def time_fwd_bwd(forward, x: torch.Tensor, reps: int) -> float:
    """Median seconds of forward + backward of sum(output)."""
    times = []
    for i in range(reps + 1):
        xi = x.detach().requires_grad_()
        t0 = time.perf_counter()
        forward(xi).float().pow(2).mean().backward()
        if i:  # the first run warms up allocators and kernels
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1, self.w3 = nn.Linear(dim, hidden, bias=False), nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def deepspeed_row(a, x: torch.Tensor) -> tuple[str, float | None, str]:
    try:
        os.environ.setdefault("DS_BUILD_OPS", "0")
        import deepspeed
        from deepspeed.moe.layer import MoE as DeepSpeedMoE
    except Exception as e:  # noqa: BLE001 - any import failure is reported in the table
        return "deepspeed", None, f"not available ({type(e).__name__}: {str(e).splitlines()[0][:80]})"
    try:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
        deepspeed.init_distributed(dist_backend="gloo", verbose=False)
        # drop_tokens=False sizes capacity to the busiest expert: nothing is dropped.
        moe = DeepSpeedMoE(a.dim, expert=SwiGLU(a.dim, a.hidden), num_experts=a.experts, ep_size=1, k=a.top_k,
                           drop_tokens=False, use_rts=False)
        shared = SwiGLU(a.dim, a.hidden)
        init_(moe), init_(shared, 1)
        t = time_fwd_bwd(lambda v: moe(v)[0] + shared(v), x, a.reps)
        return f"deepspeed {deepspeed.__version__} MoE", t, "GShard dispatch, drop_tokens=False, + shared"
    except Exception as e:  # noqa: BLE001
        return "deepspeed", None, f"not available ({type(e).__name__}: {str(e).splitlines()[0][:80]})"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ep_worker(rank: int, a, port: int, ep: int, out) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from parallel import apply_expert_parallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.manual_seed(0)
    moe = init_(MoE(make_args(a)))
    if ep == 2:
        apply_expert_parallel(moe, init_device_mesh("cpu", (2,), mesh_dim_names=("ep",)))
    x = torch.randn(a.tokens // 2, a.dim, generator=torch.Generator().manual_seed(rank))
    dist.barrier()
    t = time_fwd_bwd(lambda v: moe(v)[0], x, a.reps)
    times = [None, None]
    dist.all_gather_object(times, t)
    if rank == 0:
        out.put(max(times))
    dist.destroy_process_group()


def ep_tokens_per_s(a, ep: int) -> float:
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(_ep_worker, args=(a, _free_port(), ep, queue), nprocs=2, start_method="spawn")
    return a.tokens / queue.get()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--top-k", type=int, default=1)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--skip-ep", action="store_true", help="leave out the 2-rank EP rows")
    a = p.parse_args()
    x = torch.randn(a.tokens, a.dim, generator=torch.Generator().manual_seed(0))

    rows: list[tuple[str, float | None, str]] = []
    herd = init_(MoE(make_args(a)))
    rows.append(("herd MoE", time_fwd_bwd(lambda v: herd(v)[0], x, a.reps), "grouped matmul + shared expert"))
    dense = init_(FeedForward(a.dim, 2 * a.hidden))
    rows.append((f"dense SwiGLU (hidden {2 * a.hidden})", time_fwd_bwd(dense, x, a.reps), "same active parameters"))
    try:
        import transformers
        from transformers.models.llama4.modeling_llama4 import Llama4TextMoe

        cfg = transformers.Llama4TextConfig(hidden_size=a.dim, intermediate_size=a.hidden, num_local_experts=a.experts,
                                            num_experts_per_tok=a.top_k, hidden_act="silu")
        hf = init_(Llama4TextMoe(cfg))
        rows.append((f"transformers {transformers.__version__} Llama4TextMoe",
                     time_fwd_bwd(lambda v: hf(v)[0], x, a.reps), "all experts on all tokens"))
    except Exception as e:  # noqa: BLE001
        rows.append(("transformers Llama4TextMoe", None, f"not available ({type(e).__name__}: {e})"))
    rows.append(deepspeed_row(a, x))

    print(f"\nMoE layer, forward + backward, {a.tokens} tokens, dim {a.dim}, {a.experts} experts, top-{a.top_k}, "
          f"expert hidden {a.hidden}; {torch.get_num_threads()} threads on {torch.device('cpu')}, fp32")
    print(f"{'layer':44s} {'median ms':>10s} {'tokens/s':>10s}  note")
    for name, t, note in rows:
        if t is None:
            print(f"{name:44s} {'-':>10s} {'-':>10s}  {note}")
        else:
            print(f"{name:44s} {t * 1e3:10.1f} {a.tokens / t:10,.0f}  {note}")
    if not a.skip_ep:
        ep1, ep2 = ep_tokens_per_s(a, 1), ep_tokens_per_s(a, 2)
        print(f"\nherd MoE on 2 gloo ranks (1 thread each, {a.tokens // 2} tokens per rank, layer forward + backward):")
        print(f"  EP=1 (all experts on every rank)       {ep1:10,.0f} tokens/s")
        print(f"  EP=2 ({a.experts // 2} experts per rank, all-to-all)  {ep2:10,.0f} tokens/s   ({ep2 / ep1:.2f}x)")


if __name__ == "__main__":
    main()
