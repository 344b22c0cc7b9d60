"""metrics.jsonl (the source of truth), the rank-0 console line, and model FLOPs for MFU."""
from __future__ import annotations

import json
import logging
import os

import torch

from model import ModelArgs

log = logging.getLogger("herd")

# Dense bf16 peak FLOP/s of common accelerators, by substring of the device name.
_PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in _PEAK_BF16.items() if k in name), None)


def flops_per_token(args: ModelArgs, seq_len: int, active_params_no_embedding: int) -> float:
    """Training FLOPs per token: 6 x active matmul parameters, plus attention scores and values
    (12 x layers x heads x head_dim x attended length; chunked layers see at most a chunk)."""
    attn = 0.0
    for i in range(args.n_layers):
        span = seq_len
        if not args.is_nope_layer(i) and args.attention_chunk_size:
            span = min(seq_len, args.attention_chunk_size)
        attn += 12 * args.n_heads * args.head_size * span / 2  # causal: half the square on average
    return 6 * active_params_no_embedding + attn


class MetricsWriter:
    def __init__(self, run_dir: str, is_main: bool, total_steps: int):
        self.is_main, self.total_steps = is_main, total_steps
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self._f = open(self.path, "a") if is_main else None

    def write(self, row: dict) -> None:
        if not self.is_main:
            return
        self._f.write(json.dumps(row) + "\n")
        self._f.flush()
        line = (f"step {row['step']}/{self.total_steps} | loss {row['loss']:.4f} | lr {row['lr']:.2e} | "
                f"grad {row['grad_norm']:.3f} | {row['tokens_per_s']:,.0f} tok/s")
        if "mfu" in row:
            line += f" | mfu {row['mfu']:.1%}"
        log.info(line)

    def write_event(self, row: dict) -> None:
        """A line that is not a step's metrics (a skipped step, for instance)."""
        if self.is_main:
            self._f.write(json.dumps(row) + "\n")
            self._f.flush()

    def close(self) -> None:
        if self._f:
            self._f.close()
