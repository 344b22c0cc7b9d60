"""Build a model preset on the meta device and print its parameters per component.

    python launch/plan.py +model=scout
"""
from __future__ import annotations

import os
import sys

import hydra
import torch
from omegaconf import OmegaConf

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from model import ModelArgs, Transformer  # noqa: E402
from model.params import count_parameters  # noqa: E402
from train.config import register_configs  # noqa: E402

register_configs()


def plan(args: ModelArgs) -> dict:
    with torch.device("meta"):
        model = Transformer(args)
    counts = count_parameters(model)
    width = max(len(c) for c in counts)
    print(f"{'component':<{width}}  {'total':>16}  {'active':>16}")
    for c, (total, active) in counts.items():
        print(f"{c:<{width}}  {total:>16,}  {active:>16,}")
    total = sum(t for t, _ in counts.values())
    active = sum(a for _, a in counts.values())
    print(f"{'all':<{width}}  {total:>16,}  {active:>16,}")
    print(f"{'':<{width}}  {total / 1e9:>15.2f}B  {active / 1e9:>15.2f}B")
    return {"total": total, "active": active, "components": counts}


def main(overrides: list[str]) -> None:
    # The compose API reads the same configs as pretrain.py without creating a run directory.
    config_dir = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
    with hydra.initialize_config_dir(config_dir=config_dir, version_base="1.3"):
        cfg = hydra.compose("pretrain", overrides=overrides)
    if OmegaConf.is_missing(cfg, "model"):
        raise SystemExit("choose a model preset: python launch/plan.py +model=tiny|scout|maverick|behemoth")
    plan(ModelArgs(**OmegaConf.to_container(cfg.model)))


if __name__ == "__main__":
    main(sys.argv[1:])
