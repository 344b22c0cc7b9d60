"""Training step of a Scout-width proxy in bf16 and in each FP8 recipe and backend, side by side,
then the raw GEMMs behind them (bf16 against FP8, dense and grouped). Needs one CUDA GPU.

    python benchmarks/gpu_step.py                         # dim 5120, 2 layers (dense + MoE), 16 experts
    python benchmarks/gpu_step.py --layers 1 --moe-every 1 --seq 8192 --json out.json
    python benchmarks/gpu_step.py --smoke                 # a tiny model on the CPU: checks the script runs

The proxy has Scout's widths (dim 5120, 40 heads / 8 kv heads of 128, expert and shared-expert
hidden 8192, dense FFN 16384, 16 experts, top-1) and few layers; --vocab defaults to 32768, not
Scout's 202048, so that fp32 weights, gradients and AdamW moments fit one 80 GB GPU (the output
head stays in bf16 under every recipe, so it would only dilute the comparison). Each row builds the
model on the GPU, converts it (parallelize_model: FP8, then torch.compile per block unless
--no-compile), trains --warmup steps, then times --steps steps of forward + backward + AdamW under
bf16 autocast. TFLOP/s count 6 x active matmul parameters + attention per token
(train.metrics.flops_per_token); MFU is against the GPU's dense bf16 peak, as torchtitan reports it.
A row whose backend or GPU cannot run it says why instead of a number. No asserts: it prints tables.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import torch.nn.functional as F

from model import ModelArgs, Transformer
from model.args import VisionArgs
from model.params import count_parameters
from parallel import Fp8Config, parallelize_model
from parallel.fp8 import quantize
from train.metrics import flops_per_token, peak_flops

ROWS = [("bf16", "none", "native"), ("native tensorwise", "tensorwise", "native"),
        ("native rowwise", "rowwise", "native"), ("torchao tensorwise", "tensorwise", "torchao"),
        ("torchao rowwise", "rowwise", "torchao"), ("torchao mxfp8", "mxfp8", "torchao"),
        ("te tensorwise", "tensorwise", "te"), ("te blockwise", "blockwise", "te"), ("te mxfp8", "mxfp8", "te")]


def proxy_args(a) -> ModelArgs:
    return ModelArgs(vocab_size=a.vocab, dim=a.dim, n_layers=a.layers, n_heads=a.heads, n_kv_heads=a.kv_heads,
                     head_dim=a.dim // a.heads, ffn_hidden=a.ffn_hidden, expert_hidden=a.expert_hidden,
                     n_experts=a.experts, top_k=1, shared_expert=True, interleave_moe_layer_step=a.moe_every,
                     max_seq_len=max(a.seq, 8192), attention_chunk_size=8192, use_qk_norm=True,
                     vision=VisionArgs(enabled=False))


def step_row(a, args: ModelArgs, recipe: str, backend: str, device: torch.device) -> dict:
    """Time --steps training steps of the proxy with this FP8 setting."""
    torch._dynamo.reset()
    with torch.device(device):
        model = Transformer(args)
        model.init_weights()
    counts = count_parameters(model)
    active = sum(act for c, (_, act) in counts.items() if c != "embedding")
    model = parallelize_model(model, None, compile=a.compile and device.type == "cuda", device_type=device.type,
                              fp8=Fp8Config(recipe, backend))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    tokens = torch.randint(0, args.vocab_size, (a.batch, a.seq + 1), device=device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
            logits = model(tokens[:, :-1])
        F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(a.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(a.steps):
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    dt = statistics.median(times)
    n_tokens = a.batch * a.seq
    tflops = flops_per_token(args, a.seq, active) * n_tokens / dt / 1e12
    peak = peak_flops(device)
    row = {"step_s": dt, "tokens_per_s": n_tokens / dt, "tflops": tflops,
           "mfu": tflops * 1e12 / peak if peak else None,
           "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None}
    return row


def time_op(fn, reps: int, device: torch.device) -> float:
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps


def gemm_rows(a, device: torch.device) -> list[tuple[str, str]]:
    """Raw matmul TFLOP/s, bf16 against FP8 e4m3, for one expert-sized dense GEMM and the grouped
    GEMM of the routed experts (balanced groups)."""
    M, K, N, E = a.batch * a.seq, a.dim, a.expert_hidden, a.experts
    hp = torch.bfloat16 if device.type == "cuda" else torch.float32
    x, w = torch.randn(M, K, device=device, dtype=hp), torch.randn(N, K, device=device, dtype=hp)
    qx, sx = quantize(x, torch.float8_e4m3fn)
    qw, sw = quantize(w, torch.float8_e4m3fn)
    rx, rsx = quantize(x, torch.float8_e4m3fn, 1)
    rw, rsw = quantize(w, torch.float8_e4m3fn, 1)
    flops = 2 * M * K * N
    cases = {
        f"dense {M}x{K}x{N} {'bf16' if hp == torch.bfloat16 else 'fp32'}": lambda: x @ w.t(),
        "dense fp8 tensorwise": lambda: torch._scaled_mm(qx, qw.t(), sx, sw, out_dtype=hp),
        "dense fp8 tensorwise, fast accum": lambda: torch._scaled_mm(qx, qw.t(), sx, sw, out_dtype=hp,
                                                                     use_fast_accum=True),
        "dense fp8 rowwise": lambda: torch._scaled_mm(rx, rw.t(), rsx, rsw.t(), out_dtype=hp),
    }
    we = torch.randn(E, K, N, device=device, dtype=hp)
    offs = torch.arange(1, E + 1, device=device, dtype=torch.int32) * (M // E)
    qwe, swe = quantize(we, torch.float8_e4m3fn, 1)
    qwe = qwe.transpose(-2, -1).contiguous().transpose(-2, -1)
    cases[f"grouped {E} x {M // E}x{K}x{N} bf16"] = lambda: torch._grouped_mm(x.bfloat16(), we.bfloat16(), offs=offs)
    cases["grouped fp8 rowwise"] = lambda: torch._scaled_grouped_mm(rx, qwe, rsx.flatten(), swe.flatten(1),
                                                                    offs=offs, out_dtype=torch.bfloat16)
    out = []
    for name, fn in cases.items():
        try:
            out.append((name, f"{flops / time_op(fn, a.gemm_reps, device) / 1e12:8.1f}"))
        except Exception as e:  # noqa: BLE001 - a kernel this GPU or build lacks is a row, not a crash
            out.append((name, f"n/a: {str(e).splitlines()[0][:90]}"))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dim", type=int, default=5120)
    p.add_argument("--heads", type=int, default=40)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--ffn-hidden", type=int, default=16384)
    p.add_argument("--expert-hidden", type=int, default=8192)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--moe-every", type=int, default=2, help="2: layer 0 dense FFN, layer 1 MoE; 1: all MoE")
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--gemm-reps", type=int, default=20)
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--rows", default="", help="comma-separated row names to run (default: all)")
    p.add_argument("--json", default="", help="also write the results here")
    p.add_argument("--smoke", action="store_true", help="a tiny model on the CPU, to check the script runs")
    a = p.parse_args()
    if a.smoke:
        a.dim, a.heads, a.kv_heads, a.ffn_hidden, a.expert_hidden, a.experts = 256, 4, 2, 1024, 512, 4
        a.vocab, a.seq, a.batch, a.warmup, a.steps, a.gemm_reps = 1024, 128, 2, 1, 2, 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not a.smoke:
        raise SystemExit("benchmarks/gpu_step.py needs a CUDA GPU (FP8 kernels, bf16 peak, memory figures); "
                         "on this machine run it with --smoke, which only checks that every row runs")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (smoke: timings mean nothing)"
    args = proxy_args(a)
    print(f"{name}; torch {torch.__version__}; proxy dim {a.dim}, {a.layers} layer(s) (MoE every {a.moe_every}), "
          f"{a.experts} experts of {a.expert_hidden}, vocab {a.vocab}; batch {a.batch} x seq {a.seq}; "
          f"compile {a.compile and device.type == 'cuda'}; compute "
          f"{'bf16 autocast' if device.type == 'cuda' else 'fp32 (the bf16 row)'}")
    wanted = {r.strip() for r in a.rows.split(",") if r.strip()}
    results = {}
    print(f"{'row':<20} {'step s':>8} {'tokens/s':>10} {'TFLOP/s':>8} {'MFU':>6} {'peak GiB':>9}")
    for label, recipe, backend in ROWS:
        if wanted and label not in wanted:
            continue
        try:
            r = step_row(a, args, recipe, backend, device)
        except Exception as e:  # noqa: BLE001 - e.g. TE not installed, mxfp8 on a GPU before Blackwell
            r = {"error": str(e).splitlines()[0]}
        gc.collect()  # the row's model and optimizer state go before the next row's
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if "error" in r:
            results[label] = r
            print(f"{label:<20} n/a: {r['error'][:100]}")
            continue
        results[label] = r
        mfu = f"{100 * r['mfu']:5.1f}%" if r["mfu"] else "   n/a"
        mem = f"{r['peak_mem_gib']:9.1f}" if r["peak_mem_gib"] is not None else "      n/a"
        print(f"{label:<20} {r['step_s']:8.3f} {r['tokens_per_s']:10,.0f} {r['tflops']:8.1f} {mfu:>6} {mem}")
    print(f"\n{'GEMM':<44} TFLOP/s")
    gemms = gemm_rows(a, device)
    for gname, value in gemms:
        print(f"{gname:<44} {value}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": name, "args": vars(a), "steps": results, "gemms": dict(gemms)}, f, indent=1)


if __name__ == "__main__":
    main()
