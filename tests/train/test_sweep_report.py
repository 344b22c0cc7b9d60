"""launch/sweep_report.py on a fabricated sweep directory: the best lr per width and
parametrisation, a failed, an incomplete and a diverged run counted and handled, and the
parabola through the best point and its neighbours."""
import json
import math
import os

import pytest

from tests.helpers import ROOT  # noqa: F401 - puts the repository on sys.path

LRS = (1e-3, 3e-3, 1e-2)


def fake_run(path, dim, lr, metap, losses, steps=None, events=()):
    os.makedirs(path)
    with open(os.path.join(path, "config.yaml"), "w") as f:
        f.write(f"model:\n  dim: {dim}\n  n_layers: 4\n  n_experts: 8\noptim:\n  lr: {lr}\n  metap: {str(metap).lower()}\n"
                f"train:\n  steps: {steps or len(losses)}\n")
    with open(os.path.join(path, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps({"step": i, "loss": loss, "lr": lr}) + "\n" for i, loss in enumerate(losses, 1))
        f.writelines(json.dumps(e) + "\n" for e in events)


@pytest.fixture
def sweep(tmp_path):
    """Widths 64 and 128 x 3 lrs x SP/MetaP. SP's best lr moves from 3e-3 to 1e-3; MetaP's
    stays at 3e-3. Plus: a run that never wrote a config (failed), one killed half way
    (incomplete), one whose loss went NaN and one that skipped non-finite steps (diverged)."""
    best = {("sp", 64): 3e-3, ("sp", 128): 1e-3, ("mp", 64): 3e-3, ("mp", 128): 3e-3}
    for (param, dim), best_lr in best.items():
        for lr in LRS:
            if (param, dim, lr) in (("sp", 128, 1e-2), ("mp", 128, 1e-2)):
                continue  # written below, broken
            final = 3.0 + abs(math.log(lr / best_lr)) + (0.1 if dim == 64 else 0.0)
            fake_run(tmp_path / f"{param}_{dim}_{lr}", dim, lr, param == "mp", [8.0, 6.0, final + 0.2, final - 0.2])
    fake_run(tmp_path / "sp_128_nan", 128, 1e-2, False, [8.0, 7.0, float("nan"), float("nan")])
    fake_run(tmp_path / "mp_128_skipped", 128, 1e-2, True, [8.0, 7.0, 6.5, 6.4],
             events=[{"step": 3, "nonfinite_skipped": 1}])
    fake_run(tmp_path / "mp_128_killed", 128, 3e-2, True, [8.0, 7.0], steps=4)
    (tmp_path / "failed_job").mkdir()  # a job that died before herd wrote anything
    (tmp_path / ".submitit").mkdir()  # launcher logs: not a run
    return tmp_path


def test_best_lr_per_width_and_parametrisation(sweep, tmp_path, capsys):
    from launch.sweep_report import main

    out = main([str(sweep), "--last-k", "2", "--png", str(tmp_path / "r.png"), "--json", str(tmp_path / "r.json")])
    text = capsys.readouterr().out
    assert out["variable"] == "model.dim"
    best = {(g["param"], g["value"]): g["best_lr"] for g in out["groups"]}
    assert best == {("SP", 64): 3e-3, ("SP", 128): 1e-3, ("MetaP", 64): 3e-3, ("MetaP", 128): 3e-3}
    # last-k = 2 averages final + 0.2 and final - 0.2
    loss = {(g["param"], g["value"]): dict(zip(g["lrs"], g["losses"])) for g in out["groups"]}
    assert loss[("MetaP", 64)][3e-3] == pytest.approx(3.1)
    status = {os.path.basename(r["path"]): r["status"] for r in out["runs"]}
    assert status["sp_128_nan"] == status["mp_128_skipped"] == "diverged"
    assert status["mp_128_killed"] == "incomplete" and status["failed_job"] == "failed"
    assert ".submitit" not in status and len(status) == 14
    # diverged runs stay in their group as the worst point; failed and incomplete ones are left out
    assert math.isinf(loss[("SP", 128)][1e-2]) and 3e-2 not in loss[("MetaP", 128)]
    assert "10 ok, 2 diverged, 1 incomplete, 1 failed" in text
    assert "SP: best lr from 1e-03 to 3e-03 (3x)" in text and "MetaP: best lr from 3e-03 to 3e-03 (1x)" in text
    assert (tmp_path / "r.png").stat().st_size > 0 and json.loads((tmp_path / "r.json").read_text())["groups"]


def test_a_run_with_a_truncated_line_and_no_losses(tmp_path):
    from launch.sweep_report import read_run

    fake_run(tmp_path / "a", 64, 1e-3, True, [5.0, 4.0])
    with open(tmp_path / "a" / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "lo')  # cut short by a kill
    assert read_run(str(tmp_path / "a"), 1).loss == 4.0
    fake_run(tmp_path / "b", 64, 1e-3, True, [], steps=10)
    assert read_run(str(tmp_path / "b"), 1).status == "failed"


def test_fitted_optimum_is_the_parabolas_minimum():
    from launch.sweep_report import fitted_optimum

    lrs = [1e-4, 1e-3, 1e-2, 1e-1]
    # loss = (log10 lr + 2.5)^2: minimum at lr = 10^-2.5
    losses = [(math.log10(lr) + 2.5) ** 2 for lr in lrs]
    assert fitted_optimum(lrs, losses) == pytest.approx(10 ** -2.5, rel=1e-9)
    assert fitted_optimum(lrs, [1.0, 2.0, 3.0, 4.0]) is None  # best at the grid's edge
