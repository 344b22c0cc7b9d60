"""metrics.jsonl (the source of truth), the rank-0 console line, and model FLOPs for MFU."""
from __future__ import annotations

import json
import logging
import os
import time

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


def format_duration(seconds: float) -> str:
    """1h02m, 3m05s, 42s: what a person reads at a glance."""
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    if h:
        return f"{h}h{m:02d}m"
    return f"{m}m{s:02d}s" if m else f"{s}s"


class MetricsWriter:
    """metrics.jsonl on the main rank, plus the console line with the time remaining.

    A run that starts at `start_step` (0, or the step of the checkpoint it resumed from) owns
    every line after that step: lines an earlier attempt logged past it (a run killed after its
    last checkpoint, or a new run in a used run.dir) are moved to metrics.rewound.jsonl, so
    metrics.jsonl holds each step once, in order."""

    def __init__(self, run_dir: str, is_main: bool, total_steps: int, start_step: int = 0):
        self.is_main, self.total_steps = is_main, total_steps
        self.start_step = start_step
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self._t0 = time.perf_counter()
        self._f = None
        if is_main:
            self._rewind(start_step)
            self._f = open(self.path, "a")

    def _rewind(self, start_step: int) -> None:
        if not os.path.exists(self.path):
            return
        keep, moved = [], []
        with open(self.path) as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    step = json.loads(line).get("step", 0)
                except ValueError:  # a line cut short by a crash
                    step = start_step + 1
                (keep if step <= start_step else moved).append(line if line.endswith("\n") else line + "\n")
        if not moved:
            return
        with open(os.path.join(os.path.dirname(self.path), "metrics.rewound.jsonl"), "a") as f:
            f.writelines(moved)
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(keep)
        os.replace(tmp, self.path)
        log.info(f"metrics.jsonl: {len(moved)} line(s) after step {start_step} came from an earlier attempt; "
                 "moved to metrics.rewound.jsonl")

    def eta_seconds(self, step: int) -> float | None:
        """Time remaining at the mean pace of this attempt's steps so far."""
        done = step - self.start_step
        if done <= 0:
            return None
        return (time.perf_counter() - self._t0) / done * (self.total_steps - step)

    def write(self, row: dict) -> None:
        if not self.is_main:
            return
        self._f.write(json.dumps(row) + "\n")
        self._f.flush()
        phase = f" ({row['phase']})" if "phase" in row else ""
        line = (f"step {row['step']}/{self.total_steps}{phase} | loss {row['loss']:.4f} | lr {row['lr']:.2e} | "
                f"grad {row['grad_norm']:.3f} | {row['tokens_per_s']:,.0f} tok/s")
        if "mfu" in row:
            line += f" | mfu {row['mfu']:.1%}"
        eta = self.eta_seconds(row["step"])
        if eta is not None and row["step"] < self.total_steps:
            line += f" | eta {format_duration(eta)}"
        log.info(line)

    def write_event(self, row: dict) -> None:
        """A line that is not a step's metrics (a skipped step, for instance)."""
        if self.is_main:
            self._f.write(json.dumps(row) + "\n")
            self._f.flush()

    def close(self) -> None:
        if self._f:
            self._f.close()
            self._f = None
