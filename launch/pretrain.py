"""herd's main job.

    torchrun --standalone --nproc_per_node=2 launch/pretrain.py +model=tiny
    python launch/pretrain.py +model=tiny train.steps=50
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

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
    except (ValueError, FileNotFoundError, FloatingPointError) as e:
        # A user's mistake or a diverged run: one line that names it, not a traceback per rank.
        if rank == 0:
            print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except CollectiveError as e:  # names its own rank: every rank reports
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(3) from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
