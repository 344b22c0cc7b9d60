"""Attention of one layer on a packed row, forward + backward: the dense-mask path herd used
before (kept below as `dense_attend`) next to segment attention (model/attention.py).

    python benchmarks/attention_memory.py                          # 1K..32K, tiny's head shape
    python benchmarks/attention_memory.py --lengths 4096,65536 --heads 40 --kv-heads 8 --head-dim 128

Per seq_len and layer kind (chunked RoPE layer, global NoPE layer), one row of packed documents
(lengths drawn from an exponential distribution, fixed seed), batch 1:
  setup ms     building the masks (dense) or the segments (new); done once per forward in the model
  fwd+bwd ms   one layer's attention forward + backward, median of --reps after a warm-up
  peak MiB     CPU: peak RSS of a fresh process for setup + one forward + backward, above the RSS
               it held with q, k, v allocated; CUDA: torch.cuda.max_memory_allocated above the
               same baseline
CPU rows run in a subprocess each; on a machine with CUDA the same table is printed for the
CUDA device too (in-process). No asserts: it prints tables.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import torch.nn.functional as F

from model.attention import AttentionLayout


# ---------------------------------------------------------------- the old path, for reference


def dense_masks(seq_len, chunk_size, positions, doc_ids):
    """herd's former AttentionMasks for packed rows: boolean [B, 1, T, T] masks, True where
    attention is allowed (causal, same document, and for chunked layers same chunk)."""
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=doc_ids.device).tril()
    same_doc = doc_ids[:, None, :, None] == doc_ids[:, None, None, :]
    global_mask = causal & same_doc
    chunk = torch.div(positions, chunk_size, rounding_mode="floor")
    chunked_mask = causal & (chunk[:, None, :, None] == chunk[:, None, None, :]) & same_doc
    return global_mask, chunked_mask


def dense_attend(q, k, v, mask):
    """The former attention call: SDPA with a boolean mask, q [B, T, H, D], k/v [B, T, Hkv, D]."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=mask, enable_gqa=True)
    return out.transpose(1, 2)


# ---------------------------------------------------------------- one measurement


def packed_row(seq_len: int, mean_doc: int, seed: int = 0):
    """positions, doc_ids [1, T] of a row packed with documents of exponentially distributed length."""
    g = torch.Generator().manual_seed(seed)
    lengths, total = [], 0
    while total < seq_len:
        n = max(1, int(torch.empty(1).exponential_(1 / mean_doc, generator=g).item()))
        n = min(n, seq_len - total)
        lengths.append(n)
        total += n
    positions = torch.cat([torch.arange(n) for n in lengths])
    doc_ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])
    return positions[None], doc_ids[None], len(lengths)


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure(path: str, kind: str, seq_len: int, device: str, a) -> dict:
    dev = torch.device(device)
    dtype = getattr(torch, a.dtype) if a.dtype != "auto" else (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    positions, doc_ids, n_docs = packed_row(seq_len, a.mean_doc)
    positions, doc_ids = positions.to(dev), doc_ids.to(dev)
    g = torch.Generator(device=dev).manual_seed(0)
    q, k, v = (torch.randn(1, seq_len, h, a.head_dim, generator=g, device=dev, dtype=dtype)
               for h in (a.heads, a.kv_heads, a.kv_heads))
    chunked = kind == "chunked"
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def setup():
        if path == "dense":
            global_mask, chunked_mask = dense_masks(seq_len, a.chunk, positions, doc_ids)
            return lambda q, k, v: dense_attend(q, k, v, chunked_mask if chunked else global_mask)
        layout = AttentionLayout(1, seq_len, a.chunk, positions, doc_ids, dev)
        return lambda q, k, v: layout.attend(q, k, v, chunked)

    def step(attend):
        qi, ki, vi = (t.detach().requires_grad_() for t in (q, k, v))
        attend(qi, ki, vi).float().square().mean().backward()

    # Peak memory of setup + one step, from a clean high-water mark.
    sync()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")
        base = status_kib("VmRSS") * 1024
    t0 = time.perf_counter()
    attend = setup()
    sync()
    setup_s = time.perf_counter() - t0
    step(attend)
    sync()
    peak = torch.cuda.max_memory_allocated() if dev.type == "cuda" else status_kib("VmHWM") * 1024

    times, start = [], time.perf_counter()
    for _ in range(a.reps):
        t0 = time.perf_counter()
        step(attend)
        sync()
        times.append(time.perf_counter() - t0)
        if time.perf_counter() - start > a.max_seconds:
            break
    return {"setup_ms": setup_s * 1e3, "step_ms": statistics.median(times) * 1e3,
            "peak_mib": (peak - base) / 2**20, "docs": n_docs}


def measure_in_subprocess(path, kind, seq_len, a) -> dict:
    cmd = [sys.executable, __file__, "--worker", f"{path},{kind},{seq_len}", "--chunk", str(a.chunk),
           "--mean-doc", str(a.mean_doc), "--heads", str(a.heads), "--kv-heads", str(a.kv_heads),
           "--head-dim", str(a.head_dim), "--reps", str(a.reps), "--max-seconds", str(a.max_seconds),
           "--dtype", a.dtype]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(device: str, a) -> None:
    dtype = a.dtype if a.dtype != "auto" else ("bfloat16" if device == "cuda" else "float32")
    print(f"\n{device}: heads {a.heads}/{a.kv_heads} kv, head_dim {a.head_dim}, chunk {a.chunk}, "
          f"mean document {a.mean_doc} tokens, batch 1, {dtype}")
    print(f"{'seq_len':>8} {'layer':>8} {'docs':>5} | {'setup ms':>17} | {'fwd+bwd ms':>23} | {'peak MiB':>24}")
    print(f"{'':>8} {'':>8} {'':>5} | {'dense':>8} {'new':>8} | {'dense':>8} {'new':>8} {'x':>5} | "
          f"{'dense':>8} {'new':>8} {'x':>6}")
    for seq_len in a.lengths:
        for kind in ("chunked", "global"):
            row = {}
            for path in ("dense", "new"):
                skip = path == "dense" and seq_len > a.dense_max
                if skip:
                    row[path] = {"error": "skipped"}
                elif device == "cpu":
                    row[path] = measure_in_subprocess(path, kind, seq_len, a)
                else:
                    try:
                        row[path] = measure(path, kind, seq_len, device, a)
                    except torch.OutOfMemoryError:
                        row[path] = {"error": "out of memory"}
                    torch.cuda.empty_cache()
            d, n = row["dense"], row["new"]
            fmt = lambda r, key, w=8: f"{r[key]:>{w},.1f}" if key in r else f"{'-':>{w}}"  # noqa: E731
            ratio = lambda key, w: (f"{d[key] / n[key]:>{w}.1f}" if key in d and key in n else f"{'-':>{w}}")  # noqa: E731
            print(f"{seq_len:>8} {kind:>8} {n.get('docs', '-'):>5} | {fmt(d, 'setup_ms')} {fmt(n, 'setup_ms')} | "
                  f"{fmt(d, 'step_ms')} {fmt(n, 'step_ms')} {ratio('step_ms', 5)} | "
                  f"{fmt(d, 'peak_mib')} {fmt(n, 'peak_mib')} {ratio('peak_mib', 6)}", flush=True)
            for path, r in row.items():
                if "error" in r and r["error"] != "skipped":
                    print(f"         {path} at {seq_len}: {r['error']}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="1024,2048,4096,8192,16384,32768")
    p.add_argument("--chunk", type=int, default=1024, help="attention_chunk_size of the chunked layers")
    p.add_argument("--mean-doc", type=int, default=2048, help="mean document length in the packed row")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--dtype", default="auto", help="auto: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--max-seconds", type=float, default=10.0, help="stop repeating a row after this long")
    p.add_argument("--dense-max", type=int, default=32768, help="skip the dense path above this seq_len")
    p.add_argument("--devices", default="auto", help="cpu, cuda or cpu,cuda (auto: cpu, plus cuda if present)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        path, kind, seq_len = a.worker.split(",")
        print(json.dumps(measure(path, kind, int(seq_len), "cpu", a)))
        return
    a.lengths = [int(x) for x in a.lengths.split(",")]
    devices = a.devices.split(",") if a.devices != "auto" else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    for device in devices:
        table(device, a)


if __name__ == "__main__":
    main()
