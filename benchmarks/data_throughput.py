"""Throughput of the multimodal data path, per worker, next to the raw rate of the same shards.

    python benchmarks/data_throughput.py                      # the embedded sample shards
    python benchmarks/data_throughput.py --urls 'shards/{000..099}.tar' --seq-len 8192 --workers 4

Rows:
  read        tar reading only (bytes off disk or pipe, grouped into samples)
  read+decode read + JSON/text parsing + image and video decoding and tiling (the raw rate)
  pipeline    one worker stream end to end: decode, tokenize, pack into batches
  loader      the MultimodalLoader with --workers processes (all of them together)
No asserts: it prints a table.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from data.args import DataArgs  # noqa: E402
from data.decode import DecodeOptions, SkipSample, decode_sample  # noqa: E402
from data.loader import MultimodalLoader, resolve_urls  # noqa: E402
from data.shards import ReadUnit, read_unit  # noqa: E402
from data.stream import WorkerStream  # noqa: E402
from data.tokenizer import Tokenizer  # noqa: E402


def raw_rates(urls: list[str], opts: DecodeOptions, max_samples: int) -> tuple[tuple, tuple]:
    t0, n, nbytes = time.perf_counter(), 0, 0
    samples = []
    for url in urls:
        for _, s in read_unit(ReadUnit(url)):
            if "__error__" in s:
                continue
            n += 1
            nbytes += sum(len(v) for k, v in s.items() if not k.startswith("__"))
            samples.append(s)
            if n >= max_samples:
                break
        if n >= max_samples:
            break
    read_s = time.perf_counter() - t0
    t0, ok, tiles = time.perf_counter(), 0, 0
    for s in samples:
        try:
            segs = decode_sample(s, opts)
        except SkipSample:
            continue
        ok += 1
        tiles += sum(getattr(x, "pixels", torch.empty(0)).shape[0] for x in segs)
    decode_s = time.perf_counter() - t0
    return (n, read_s, nbytes), (ok, read_s + decode_s, tiles)


def pipeline_rate(args: DataArgs, urls, batch_size: int, seq_len: int, batches: int):
    tok = Tokenizer.load(args.tokenizer, args.num_special_tokens)
    stream = WorkerStream(args, urls, 0, 1, 0, 1, batch_size, seq_len, 0, tok)
    t0, tokens, tiles, n = time.perf_counter(), 0, 0, 0
    last = None
    for batch, _ in stream:
        if batch.get("_done"):
            break
        n += 1
        tokens += int((batch["doc_ids"] >= 0).sum())
        tiles += batch["images"].shape[0]
        last = batch
        if n >= batches:
            break
    dt = time.perf_counter() - t0
    return (last or {}).get("documents", 0), dt, tokens, tiles, n


def loader_rate(args: DataArgs, batch_size: int, seq_len: int, workers: int, batches: int):
    loader = MultimodalLoader(args, batch_size=batch_size, seq_len=seq_len, num_workers=workers)
    it = iter(loader)
    next(it)  # worker start-up is not throughput
    t0, tokens, n, docs0 = time.perf_counter(), 0, 0, loader.documents
    for batch in it:
        n += 1
        tokens += int((batch["doc_ids"] >= 0).sum())
        if n >= batches:
            break
    dt = time.perf_counter() - t0
    return loader.documents - docs0, dt, tokens, n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--urls", default="sample")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batches", type=int, default=40)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--max-samples", type=int, default=500)
    a = ap.parse_args()
    torch.set_num_threads(1)  # what a DataLoader worker gets

    urls = resolve_urls(a.urls)
    args = DataArgs(urls=a.urls)
    opts = DecodeOptions(max_tiles=args.max_tiles, video_fps=args.video_fps, video_max_frames=args.video_max_frames)
    (n_read, t_read, nbytes), (n_dec, t_dec, tiles_dec) = raw_rates(urls, opts, a.max_samples)
    docs, t_pipe, toks, tiles, nb = pipeline_rate(args, [urls], a.batch_size, a.seq_len, a.batches)
    ldocs, t_load, ltoks, lnb = loader_rate(args, a.batch_size, a.seq_len, a.workers, a.batches)

    print(f"shards: {len(urls)} ({a.urls}); batch {a.batch_size} x {a.seq_len}; {os.cpu_count()} cpus")
    print(f"{'stage':<28}{'samples/s':>12}{'tokens/s':>14}{'tiles/s':>11}{'MB/s':>9}")
    print(f"{'read (1 worker)':<28}{n_read / t_read:>12.1f}{'':>14}{'':>11}{nbytes / t_read / 1e6:>9.1f}")
    print(f"{'read+decode (1 worker)':<28}{n_dec / t_dec:>12.1f}{'':>14}{tiles_dec / t_dec:>11.1f}{'':>9}")
    print(f"{'pipeline (1 worker)':<28}{docs / t_pipe:>12.1f}{toks / t_pipe:>14.0f}{tiles / t_pipe:>11.1f}{'':>9}")
    print(f"{f'loader ({a.workers} workers, total)':<28}{ldocs / t_load:>12.1f}{ltoks / t_load:>14.0f}{'':>11}{'':>9}")


if __name__ == "__main__":
    main()
