"""Context parallelism: what a rank sends and holds, next to its peers' choices.

    python benchmarks/context_parallel.py                       # Scout's attention at 128K and 256K
    python benchmarks/context_parallel.py --measure 16384       # + the tiny model, 1 process vs cp=2

1. Communication per rank and layer (no processes needed: the exchange plans are computed for
   every rank of the group). For each layer kind, the K/V tokens a rank receives under herd's
   sparse exchange (parallel/context.py) next to
     all-gather   Llama 3's CP: every rank receives the other ranks' K/V, (cp-1)/cp x T tokens;
     Ulysses      DeepSpeed's head all-to-all: each rank sends and receives q, k, v and the
                  output for (cp-1)/cp of its T/cp tokens, (2 x heads + 2 x kv_heads) vectors a
                  token; capped at cp <= kv_heads;
   in MiB at bfloat16 with Scout's heads (40 q, 8 kv, head_dim 128, chunk 8192), for one long
   document filling the row and for packed documents (exponential lengths, mean 16K).
2. Causal work balance: the largest rank's query-key products over the mean, head-tail order
   (herd) vs contiguous pieces.
3. With --measure L: one forward + backward of the tiny model on a packed row of L tokens, one
   process vs 2 gloo ranks with parallel.cp=2 (weights replicated, no FSDP: activations only),
   peak RSS of the step per rank and its time. No asserts: it prints tables.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch

from model.attention import chunk_keys, document_keys
from parallel.context import head_tail_order, plan_exchange

SCOUT = {"heads": 40, "kv_heads": 8, "head_dim": 128, "chunk": 8192, "bytes": 2}


def packed(T: int, mean: int | None, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """positions, doc_ids [1, T]: one document (mean None) or exponential lengths of this mean."""
    if mean is None:
        return torch.arange(T)[None], torch.zeros(1, T, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    lengths, total = [], 0
    while total < T:
        n = max(1, min(T - total, int(torch.empty(1).exponential_(1 / mean, generator=g))))
        lengths.append(n)
        total += n
    positions = torch.cat([torch.arange(n) for n in lengths])
    doc_ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])
    return positions[None], doc_ids[None]


def received_tokens(keys: torch.Tensor, order: torch.Tensor) -> list[int]:
    return [sum(plan_exchange(keys, order, r, False, torch.device("cpu")).recv_splits) for r in range(order.shape[0])]


def causal_work(doc_ids: torch.Tensor, positions: torch.Tensor, order: torch.Tensor) -> list[int]:
    """Query-key products per rank on a global layer: each query sees its document's earlier tokens."""
    del doc_ids  # positions restart per document: a query sees position + 1 keys
    return [int((positions[0, idx] + 1).sum()) for idx in order]


def communication(lengths: list[int], cps: list[int]) -> None:
    h, hkv, d, chunk, nbytes = (SCOUT[k] for k in ("heads", "kv_heads", "head_dim", "chunk", "bytes"))
    mib = lambda tokens, vectors: tokens * vectors * d * nbytes / 2**20  # noqa: E731
    print("K/V received per rank and layer, MiB at bfloat16 (Scout heads); max over ranks")
    print(f"{'seq_len':>8} {'cp':>3} {'documents':>12} | {'chunked':>8} {'global':>8} | "
          f"{'all-gather':>10} {'Ulysses':>8} | {'global vs all-gather':>20} {'vs Ulysses':>10}")
    for T in lengths:
        for mean in (None, 16384):
            positions, doc_ids = packed(T, mean)
            for cp in cps:
                order = head_tail_order(T, cp)
                chunked = max(received_tokens(chunk_keys(positions, doc_ids, chunk), order))
                glob = max(received_tokens(document_keys(doc_ids), order))
                all_gather = mib((cp - 1) * T // cp, 2 * hkv)
                ulysses = mib((cp - 1) * T // cp**2, 2 * h + 2 * hkv) if cp <= hkv else float("nan")
                ours = mib(glob, 2 * hkv)
                label = "one" if mean is None else f"mean {mean // 1024}K"
                print(f"{T:>8} {cp:>3} {label:>12} | {mib(chunked, 2 * hkv):>8.1f} {ours:>8.1f} | "
                      f"{all_gather:>10.1f} {ulysses:>8.1f} | {ours / all_gather:>19.2f}x {ours / ulysses:>9.2f}x")


def balance(T: int, cps: list[int]) -> None:
    print(f"\nglobal-layer causal work, largest rank / mean, one document of {T} tokens")
    positions, doc_ids = packed(T, None)
    for cp in cps:
        head_tail = causal_work(doc_ids, positions, head_tail_order(T, cp))
        contiguous = causal_work(doc_ids, positions, torch.arange(T).view(cp, T // cp))
        print(f"  cp {cp}: head-tail {max(head_tail) / (sum(head_tail) / cp):.3f}   "
              f"contiguous {max(contiguous) / (sum(contiguous) / cp):.3f}")


# ---------------------------------------------------------------- measured, tiny model


def worker(seq_len: int, out_dir: str) -> None:
    """One step of the tiny model on this process's part of a packed row; writes RANK.json."""
    from omegaconf import OmegaConf

    from model import ModelArgs, Transformer
    from tests.model.long_step import packed_documents, status_kib

    cfg = OmegaConf.load(Path(ROOT) / "configs" / "model" / "tiny.yaml")
    args = ModelArgs(**OmegaConf.to_container(cfg))
    args.vision.enabled = False
    torch.manual_seed(0)
    m = Transformer(args)
    m.init_weights()
    g = torch.Generator().manual_seed(0)
    positions, doc_ids = packed_documents(seq_len, 6, pad=seq_len // 100, generator=g)
    tokens = torch.randint(0, 4096, positions.shape, generator=g)
    batch = {"tokens": tokens, "labels": torch.where(doc_ids >= 0, torch.roll(tokens, -1, 1), -100),
             "positions": positions, "doc_ids": doc_ids}
    world = int(os.environ.get("WORLD_SIZE", "1"))
    inputs = {"positions": positions, "doc_ids": doc_ids}
    if world > 1:
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh

        from parallel.context import ContextParallel, shard_batch

        dist.init_process_group("gloo")
        cp = ContextParallel.from_mesh(init_device_mesh("cpu", (world,), mesh_dim_names=("cp",)))
        batch = shard_batch(batch, cp, args, torch.device("cpu"))
        inputs = {"positions": batch["positions"], "layout": batch["layout"]}
    Path("/proc/self/clear_refs").write_text("5")
    base = status_kib("VmRSS")
    start = time.perf_counter()
    logits = m(batch["tokens"], **inputs)
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100,
                                      reduction="sum").backward()
    seconds = time.perf_counter() - start
    rank = int(os.environ.get("RANK", "0"))
    Path(out_dir, f"{world}-{rank}.json").write_text(json.dumps(
        {"rank": rank, "world": world, "peak_mib": (status_kib("VmHWM") - base) / 1024, "seconds": seconds}))


def measure(seq_len: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as out:
        me = [os.path.abspath(__file__), "--worker", str(seq_len), "--out", out]
        subprocess.run([sys.executable, *me], env=env, capture_output=True, check=True, cwd=ROOT)
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", *me], env=env,
                       capture_output=True, check=True, cwd=ROOT)
        rows = [json.loads(p.read_text()) for p in Path(out).glob("*.json")]
    print(f"\ntiny model, one training step on a packed row of {seq_len} tokens (1 thread per process)")
    print(f"{'layout':>10} {'rank':>4} | {'step peak MiB':>13} {'seconds':>8}")
    for r in sorted(rows, key=lambda r: (r["world"], r["rank"])):
        print(f"{'cp=' + str(r['world']):>10} {r['rank']:>4} | {r['peak_mib']:>13.0f} {r['seconds']:>8.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", default="131072,262144", help="sequence lengths, comma-separated")
    parser.add_argument("--cp", default="2,4,8", help="context-parallel sizes, comma-separated")
    parser.add_argument("--measure", type=int, help="also measure the tiny model at this seq_len")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.worker:
        return worker(a.worker, a.out)
    cps = [int(c) for c in a.cp.split(",")]
    lengths = [int(n) for n in a.lengths.split(",")]
    communication(lengths, cps)
    balance(lengths[-1], cps)
    if a.measure:
        measure(a.measure)


if __name__ == "__main__":
    main()
