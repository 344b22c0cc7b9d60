"""Runs that survive: resharding across layouts, a crash in the middle of a checkpoint write,
asynchronous saves and non-finite losses (stops from outside: tests/train/test_signals.py)."""
import json
import math
import os

import pytest
import torch

from tests.helpers import run_ranks
from tests.train.procs import losses, train_in_process


@pytest.mark.parametrize("before,after", [((2, "parallel.ep=2"), (1, "parallel.ep=1")),
                                          ((1, "parallel.ep=1"), (2, "parallel.ep=2"))])
def test_checkpoint_loads_into_another_layout(tmp_path, before, after):
    """Saved on 2 ranks with ep=2, resumed on 1 rank (and the reverse): the next losses agree with
    the uninterrupted run to 1e-5 relative, what fp32 sums in another order give. The global
    batch is kept (2 rows per rank on 2 ranks, 4 on 1)."""
    def layout(nproc, ep, *overrides):
        args = ("data=text", ep, f"train.batch_size={4 // nproc}", "model.router_aux_loss_coef=0.02", *overrides)
        return run_ranks(train_in_process, 2, *args) if nproc == 2 else train_in_process(*args)
    layout(*before, "train.steps=8", "checkpoint.interval=4", f"run.dir={tmp_path}/ref")
    layout(*after, "train.steps=8", f"run.dir={tmp_path}/moved",
           f"checkpoint.load={tmp_path}/ref/checkpoints/step-00000004")
    a, b = losses(tmp_path / "ref"), losses(tmp_path / "moved")
    assert sorted(b) == [5, 6, 7, 8]
    for s in b:
        assert b[s][0] == pytest.approx(a[s][0], rel=1e-5), s
    assert b[5][0] != pytest.approx(losses(tmp_path / "ref")[1][0], rel=1e-3)  # it did start from step 4


def test_crash_while_writing_keeps_the_previous_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    base = ["data=text", "train.steps=6", "checkpoint.interval=2", f"run.dir={run_dir}"]
    with pytest.raises(RuntimeError, match="exit code 17"):  # the process dies in the middle of the write
        run_ranks(train_in_process, 1, *base, "train.faults.crash_in_save_step=4")
    assert sorted(os.listdir(run_dir / "checkpoints")) == ["step-00000002", "step-00000004.tmp"]
    rows = train_in_process(*base)
    assert [r["step"] for r in rows] == [3, 4, 5, 6]  # resumed from step 2
    assert sorted(os.listdir(run_dir / "checkpoints")) == ["step-00000002", "step-00000004", "step-00000006"]


def test_async_save_writes_complete_checkpoints(tmp_path):
    run_dir = tmp_path / "run"
    run_ranks(train_in_process, 2, "data=text", "train.steps=6", "checkpoint.interval=2", "checkpoint.async_save=true",
              f"run.dir={run_dir}")
    ckpts = sorted(os.listdir(run_dir / "checkpoints"))
    assert ckpts == ["step-00000002", "step-00000004", "step-00000006"]
    for c in ckpts:
        assert sorted(os.listdir(run_dir / "checkpoints" / c)) == [".metadata", "__0_0.distcp", "__1_0.distcp",
                                                                   "rank-00000.json", "rank-00001.json",
                                                                   "train_state.json"]


def test_nonfinite_loss_is_skipped_then_stops(tmp_path):
    train_in_process("data=text", "train.steps=5", "train.faults.nan_steps=[3]", f"run.dir={tmp_path}/once")
    rows = [json.loads(x) for x in open(tmp_path / "once/metrics.jsonl")]
    assert {"step": 3, "nonfinite_skipped": 1} in rows
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5]
    assert all(math.isfinite(r["loss"]) for r in rows if "loss" in r)
    assert sorted(os.listdir(tmp_path / "once/checkpoints")) == ["step-00000005"]

    run_dir = tmp_path / "many"
    with pytest.raises(FloatingPointError) as e:
        train_in_process("data=text", "train.steps=8", "checkpoint.interval=2", "train.max_nonfinite_in_row=2",
                         "train.faults.nan_steps=[5,5,5]", f"run.dir={run_dir}")
    assert "3 steps in a row had a non-finite loss" in str(e.value) and "step-00000004" in str(e.value)
    assert sorted(os.listdir(run_dir / "checkpoints")) == ["step-00000002", "step-00000004"]
    from omegaconf import OmegaConf

    from model import ModelArgs, Transformer
    from train.checkpoint import load_checkpoint

    model = Transformer(ModelArgs(**OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml").model)))
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))  # so that only what the checkpoint holds can be finite
    load_checkpoint(str(run_dir / "checkpoints/step-00000004"), model)
    tensors = list(model.state_dict().values())
    assert tensors and all(torch.isfinite(t).all() for t in tensors)

