"""herd's main job.

    torchrun --standalone --nproc_per_node=2 launch/pretrain.py +model=tiny
    python launch/pretrain.py +model=tiny train.steps=50
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data.loader import DataStall  # noqa: E402
from train.config import register_configs  # noqa: E402
from train.faults import CollectiveError  # noqa: E402
from train.loop import train  # noqa: E402

register_configs()


@hydra.main(version_base="1.3", config_path="../configs", config_name="pretrain")
def main(cfg: DictConfig) -> None:
    if OmegaConf.is_missing(cfg, "model"):
        run_dir = HydraConfig.get().runtime.output_dir
        for made in (run_dir, os.path.dirname(run_dir)):  # what Hydra made for a run that never starts
            with contextlib.suppress(OSError):
                os.rmdir(made)
        raise SystemExit("choose a model preset: launch/pretrain.py +model=tiny (or scout, maverick, behemoth)")
    rank = int(os.environ.get("RANK", "0"))
    logging.getLogger("herd").setLevel(logging.INFO if rank == 0 else logging.WARNING)
    try:
        train(cfg)
    except (ValueError, FileNotFoundError, FloatingPointError, DataStall) as e:
        # A user's mistake, a diverged run or a stalled source: one line that names it, not a
        # traceback per rank. Before the process group exists every rank has the same config and
        # the same error, so rank 0 says it; after, an error may be one rank's own (its node's
        # files, its data), so every failing rank says it, with its rank.
        everyone = dist.is_initialized() and not isinstance(e, FloatingPointError)  # non-finite: a global decision
        report(f"error: rank {rank}: {e}" if everyone and not str(e).startswith("rank ") else f"error: {e}",
               rank == 0 or everyone)
        if isinstance(e, FloatingPointError) and HydraConfig.get().mode == RunMode.MULTIRUN:
            return  # a diverged point of a sweep is a result (its metrics say so); the sweep goes on
        raise SystemExit(2) from None
    except CollectiveError as e:  # names its own rank: every rank reports
        report(f"error: {e}", True)
        raise SystemExit(3) from None
    except KeyboardInterrupt:  # a second Ctrl-C: the first one asks for a checkpoint and a clean stop
        report("interrupted without a checkpoint; rerun to resume from the last one", rank == 0)
        raise SystemExit(130) from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def report(message: str, show: bool) -> None:
    """Print the error on this rank's stderr, and hand it to torchrun, whose end-of-job summary
    names the first rank that failed ("Root Cause") with this line instead of a traceback."""
    if show:
        print(message, file=sys.stderr)
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:
        with contextlib.suppress(OSError), open(error_file, "w") as f:
            json.dump({"message": {"message": message, "extraInfo": {"py_callstack": message,
                                                                     "timestamp": str(int(time.time()))}}}, f)


if __name__ == "__main__":
    main()
