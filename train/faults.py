"""What keeps a run alive on a shared cluster: preemption signals agreed on at step boundaries,
Slurm requeue, readable errors from failed collectives, and fault injection for the tests that
prove all of it."""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from collections import Counter
from contextlib import contextmanager

import torch
import torch.distributed as dist

from data.loader import STOP_SIGNALS

log = logging.getLogger("herd")


class StopRequest:
    """A stop signal (SIGTERM, SIGUSR2, SIGINT: data.loader.STOP_SIGNALS) only sets a flag; the
    loop checks it between steps, all ranks agree with one all-reduce, save a checkpoint and
    exit cleanly. A second SIGINT (Ctrl-C twice) aborts at once, without a checkpoint; one that
    follows the first within ABORT_AFTER_S is the same Ctrl-C arriving twice (from the terminal
    and forwarded by torchrun) and changes nothing."""

    ABORT_AFTER_S = 2.0

    def __init__(self):
        self.signum: int | None = None
        self._since = 0.0
        self._previous = {}
        for sig in STOP_SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. called from a worker thread): no handlers
                pass

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            if signum == signal.SIGINT and time.monotonic() - self._since > self.ABORT_AFTER_S:
                raise KeyboardInterrupt
            return
        self.signum, self._since = signum, time.monotonic()
        log.warning(f"{signal.Signals(signum).name} received: stopping after this step with a checkpoint"
                    + (" (Ctrl-C again to abort without one)" if signum == signal.SIGINT else ""))

    def agreed(self, device: torch.device) -> bool:
        """True on every rank when any rank got a stop signal."""
        flag = torch.tensor([1 if self.signum is not None else 0], device=device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def requeue_slurm_job() -> None:
    """Under Slurm, put the job back in the queue; the rerun resumes from the checkpoint."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return
    try:
        subprocess.run(["scontrol", "requeue", job], check=True, capture_output=True, text=True, timeout=60)
        log.info(f"requeued Slurm job {job}")
    except (OSError, subprocess.SubprocessError) as e:
        log.error(f"could not requeue Slurm job {job}: {e}")


class CollectiveError(RuntimeError):
    pass


@contextmanager
def failure_context(name: str, rank: int, step: int):
    """Re-raise a failed or timed-out collective with the rank, the step and what it was doing."""
    try:
        yield
    except CollectiveError:
        raise
    except RuntimeError as e:  # DistBackendError and gloo/NCCL timeouts are RuntimeErrors
        if not dist.is_initialized():
            raise
        raise CollectiveError(f"rank {rank}: {name} at step {step} failed: {str(e).splitlines()[0]}") from e


class FaultInjector:
    """Deliberate faults for tests of the recovery paths (train.faults.*); inert by default."""

    def __init__(self, cfg, rank: int):
        # A step listed k times is non-finite on k attempts (a skipped step is attempted again).
        self.nan_steps = Counter(cfg.nan_steps)
        self.empty_steps = Counter(cfg.empty_steps)
        self.hang = (cfg.hang_rank, cfg.hang_step, cfg.hang_seconds)
        self.crash_in_save_step = cfg.crash_in_save_step
        self.rank = rank

    def batches(self, micro: list[dict], step: int) -> list[dict]:
        """As the data gave them, or (at an empty step) with no target token left."""
        if self.empty_steps[step] > 0:
            self.empty_steps[step] -= 1
            return [{**b, "labels": torch.full_like(b["labels"], -100)} for b in micro]
        return micro

    def loss(self, loss: torch.Tensor, step: int) -> torch.Tensor:
        if self.nan_steps[step] > 0:
            self.nan_steps[step] -= 1
            return loss * float("nan")
        return loss

    def maybe_hang(self, step: int) -> None:
        rank, at, seconds = self.hang
        if rank == self.rank and step == at:
            time.sleep(seconds)

    def crash_in_save(self, step: int) -> None:
        if step == self.crash_in_save_step:
            os._exit(17)
