"""Helpers for tests that run the real entry point as processes (tests/train/test_resilience.py,
tests/train/test_signals.py): the command line, the run's losses, waiting for a step."""
import json
import os
import subprocess
import sys
import time

from tests.helpers import ROOT, compose, free_port

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
FAST = ["+model=tiny", "train.seq_len=128", "train.batch_size=2", "optim.lr=3e-3", "optim.warmup_steps=3"]


def cmd(nproc, *overrides):
    if nproc == 1:
        return [sys.executable, "launch/pretrain.py", *FAST, *overrides]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
            f"--master_port={free_port()}", "launch/pretrain.py", *FAST, *overrides]


def run(args, timeout=240):
    return subprocess.run(args, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


def train_in_process(*overrides):
    """train() in this process (or in a forked rank of run_ranks), with FAST's settings."""
    from train.loop import train

    return train(compose([*FAST, "logging.wandb.mode=disabled", *overrides]))


def losses(run_dir):
    """{step: (loss, grad_norm)}; a step logged twice (before a kill and after the resume) keeps
    the later line."""
    out = {}
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            if "loss" in row:
                out[row["step"]] = (row["loss"], row["grad_norm"])
    return out


def wait_for_step(run_dir, proc, step, timeout=120):
    path = os.path.join(run_dir, "metrics.jsonl")
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"run ended early: {proc.stderr.read()[-2000:]}")
        if os.path.exists(path) and any(json.loads(x).get("step", 0) >= step for x in open(path) if x.strip()):
            return
        time.sleep(0.2)
    raise TimeoutError(f"step {step} never logged")
