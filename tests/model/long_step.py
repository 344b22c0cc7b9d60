"""One training step (forward + backward) of the tiny model on one long packed row, in a process of
its own, reporting the step's peak resident memory as JSON:

    python -m tests.model.long_step 32768 [--dense]

`--dense` swaps in the dense-mask reference (tests/model/dense_attention.py) to show what the
memory test guards against. Run by tests/model/test_attention_memory.py."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

import model.transformer
from model import ModelArgs, Transformer


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def packed_documents(seq_len: int, n_docs: int, pad: int, generator: torch.Generator):
    """positions and doc_ids of one packed row: n_docs documents of random lengths, then padding."""
    cuts = torch.randperm(seq_len - pad - 1, generator=generator)[: n_docs - 1].sort().values + 1
    lengths = torch.diff(torch.cat([torch.tensor([0]), cuts, torch.tensor([seq_len - pad])]))
    positions = torch.cat([torch.arange(n) for n in lengths.tolist()] + [torch.zeros(pad, dtype=torch.long)])
    doc_ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths.tolist())] + [torch.full((pad,), -1)])
    return positions[None], doc_ids[None]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("seq_len", type=int)
    parser.add_argument("--docs", type=int, default=6)
    parser.add_argument("--dense", action="store_true")
    a = parser.parse_args()
    if a.dense:
        from tests.model.dense_attention import DenseLayout

        model.transformer.AttentionLayout = DenseLayout
    cfg = OmegaConf.load(Path(__file__).resolve().parents[2] / "configs" / "model" / "tiny.yaml")
    cfg.pop("defaults", None)
    torch.manual_seed(0)
    m = Transformer(ModelArgs(**OmegaConf.to_container(cfg)))
    m.init_weights()
    g = torch.Generator().manual_seed(0)
    positions, doc_ids = packed_documents(a.seq_len, a.docs, pad=a.seq_len // 100, generator=g)
    tokens = torch.randint(0, 4096, positions.shape, generator=g)
    labels = torch.where(doc_ids >= 0, torch.roll(tokens, -1, 1), -100)

    # Peak RSS of the step alone: reset the high-water mark (Linux >= 4.0) and subtract the RSS
    # the process already holds.
    Path("/proc/self/clear_refs").write_text("5")
    base = status_kib("VmRSS")
    start = time.perf_counter()
    logits = m(tokens, positions=positions, doc_ids=doc_ids)
    F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100).backward()
    seconds = time.perf_counter() - start
    peak = status_kib("VmHWM")
    print(json.dumps({"seq_len": a.seq_len, "base_mib": base / 1024, "step_peak_mib": (peak - base) / 1024,
                      "seconds": seconds}))


if __name__ == "__main__":
    main()
