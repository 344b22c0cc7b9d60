"""Build a model preset on the meta device and print its parameters per component.

    python launch/plan.py +model=scout [model.FIELD=VALUE ...]

Takes the same Hydra overrides as launch/pretrain.py and builds nothing but meta tensors.
"""
from __future__ import annotations

import argparse
import os
import sys

import hydra
import torch
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from model import ModelArgs, Transformer  # noqa: E402
from model.params import count_parameters  # noqa: E402
from train.config import model_args, register_configs  # noqa: E402

register_configs()


def _short(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


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
    print(f"{'':<{width}}  {_short(total):>16}  {_short(active):>16}")
    return {"total": total, "active": active, "components": counts}


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="Hydra overrides, as for launch/pretrain.py (+model=NAME first)")
    overrides = parser.parse_args(argv).overrides
    # The compose API reads the same configs as pretrain.py without creating a run directory.
    config_dir = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
    try:
        with hydra.initialize_config_dir(config_dir=config_dir, version_base="1.3"):
            cfg = hydra.compose("pretrain", overrides=overrides)
        if OmegaConf.is_missing(cfg, "model"):
            raise SystemExit("choose a model preset: python launch/plan.py +model=tiny|scout|maverick|behemoth")
        plan(model_args(cfg))
    except (HydraException, OmegaConfBaseException, ValueError) as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main(sys.argv[1:])
