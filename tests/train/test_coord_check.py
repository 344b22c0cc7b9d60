"""launch/coord_check.py and the MetaP sweep configs: the check runs end to end on two small
widths and gives finite sizes, its slope is right on a synthetic power law, and the experiment
configs derive the shapes from model.dim (also through the Slurm launcher)."""
import json
import math

import pytest

from tests.helpers import compose

# Widths 32 and 64: 1 and 2 heads of 32, so one kv head for both; 2 layers: a dense one and an MoE one.
SMALL = ["model.n_kv_heads=1", "model.n_layers=2", "model.metap_base.n_layers=2", "train.batch_size=2",
         "train.seq_len=32"]


def test_coord_check_runs_and_returns_finite_sizes(tmp_path, capsys):
    from launch.coord_check import TYPES, main, slope

    out = main(["--widths", "32", "64", "--steps", "2", "--no-plot", "--out", str(tmp_path), *SMALL])
    for param in ("sp", "metap"):
        for w in (32, 64):
            series = out["runs"][param][w]
            assert set(TYPES) <= set(series) and len(series["loss"]) == 2
            for k in TYPES:
                assert len(series[k]) == 3 and all(math.isfinite(v) and v > 0 for v in series[k]), (param, w, k)
                assert series[f"d_{k}"][0] == 0  # the change since step 0, at step 0
    # At init SP's attention output grows as width (std 0.02 at any fan-in, twice); MetaP's stays put
    at_init = {param: slope([32, 64], [out["runs"][param][w]["attention"][0] for w in (32, 64)])
               for param in ("sp", "metap")}
    assert at_init["sp"] > 0.8 and abs(at_init["metap"]) < 0.2, at_init
    assert set(out["summary"]["sp"]["block"]) == {"last", "slope", "ratio", "ok"}
    saved = json.loads((tmp_path / "coord_check.json").read_text())
    assert saved["widths"] == [32, 64] and not (tmp_path / "coord_check.png").exists()
    assert "within 3x" in capsys.readouterr().out


def test_slope_and_ratio_on_a_power_law():
    from launch.coord_check import slope, summarise

    widths = [64, 128, 256, 512]
    assert slope(widths, [3 * w ** 0.5 for w in widths]) == pytest.approx(0.5)
    assert slope(widths, [7.0] * 4) == pytest.approx(0.0, abs=1e-12)
    runs = {"sp": {w: {"block": [1.0, w / 64]} for w in widths},
            "metap": {w: {"block": [1.0, 2.0 + (w == 256)]} for w in widths}}
    summary = summarise(widths, runs)
    assert summary["sp"]["block"]["slope"] == pytest.approx(1.0) and summary["sp"]["block"]["ratio"] == 8
    assert not summary["sp"]["block"]["ok"]
    assert summary["metap"]["block"]["ratio"] == 1.5 and summary["metap"]["block"]["ok"]


def test_width_experiment_derives_the_shapes_from_dim():
    from train.config import model_args

    cfg = compose(["+model=tiny", "+experiment=metap_width", "model.dim=512", "optim.metap=true"])
    args = model_args(cfg)
    assert (args.n_heads, args.n_kv_heads, args.head_dim, args.ffn_hidden, args.expert_hidden) == (16, 8, 32, 1536, 768)
    assert not args.vision.enabled and args.logit_multiplier == 0.25 and args.residual_multiplier == 1
    assert cfg.data.kind == "text"
    depth = model_args(compose(["+model=tiny", "+experiment=metap_depth", "model.n_layers=8", "optim.metap=true"]))
    assert depth.residual_multiplier == 0.5 and depth.dim == 128 and depth.logit_multiplier == 1
    experts = model_args(compose(["+model=tiny", "+experiment=metap_experts", "model.n_experts=16"]))
    assert experts.n_experts == 16 and experts.dim == 128
    with pytest.raises(Exception, match="herd_muldiv: 100 x 1 / 32 is not a whole number"):
        model_args(compose(["+model=tiny", "+experiment=metap_width", "model.dim=100"]))


def test_width_sweep_composes_for_slurm():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    import os

    import hydra
    from hydra.core.global_hydra import GlobalHydra

    from tests.helpers import ROOT
    from train.config import register_configs

    register_configs()
    GlobalHydra.instance().clear()
    with hydra.initialize_config_dir(config_dir=os.path.join(ROOT, "configs"), version_base="1.3"):
        cfg = hydra.compose("pretrain", overrides=["+model=tiny", "+experiment=metap_width", "hydra/launcher=slurm",
                                                   "model.dim=256"], return_hydra_config=True)
    GlobalHydra.instance().clear()
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")
    assert cfg.hydra.sweep.dir == "sweeps/metap_width"
    assert cfg.model.n_heads == 8 and cfg.model.metap_base.dim == 128
