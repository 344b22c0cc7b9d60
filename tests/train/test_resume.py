"""Resume through the Trainer from every step of a run whose data crosses epoch ends: the
resumed losses equal the uninterrupted ones bitwise (fp32 on CPU). The loader's own resume at
every batch boundary, worker processes included, is tested in tests/data/test_resume.py; the
real entry point after SIGKILL in tests/train/test_signals.py."""
import json
import os
import shutil
import sys

import pytest

from tests.helpers import compose

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "data"))
from datakit import key_dataset  # noqa: E402

pytestmark = pytest.mark.xdist_group("train_test_resume")  # its module fixtures: built once

STEPS = 8


def losses(rows):
    return {r["step"]: (r["loss"], r["grad_norm"]) for r in rows}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from data.tokenizer import Tokenizer

    # 2 shards x 1 document each (one with an image): an epoch is a step or two of 2 rows of 128.
    root, _ = key_dataset(tmp_path_factory.mktemp("shards"), Tokenizer.tiny(), shards=2, per_shard=1, image_every=2)
    return root


def test_resume_from_every_step_across_epoch_ends(tmp_path, shards):
    from train.loop import train

    def run(run_dir, *extra):
        return train(compose(["+model=tiny", f"data.urls={shards}", "data.num_workers=0", "data.shuffle_buffer=2",
                              "train.seq_len=128", "train.batch_size=2", "optim.lr=3e-3", "optim.warmup_steps=2",
                              # no decay: the schedule does not depend on train.steps, so a resumed
                              # run can stop after two steps and still be compared
                              "optim.decay_fraction=0", "logging.wandb.mode=disabled", f"run.dir={run_dir}",
                              *extra]))

    ref = losses(run(tmp_path / "ref", f"train.steps={STEPS}", "checkpoint.interval=1", f"checkpoint.keep={STEPS}"))
    assert sorted(ref) == list(range(1, STEPS + 1))
    epochs = []
    for step in range(1, STEPS):
        ckpt = tmp_path / "ref" / "checkpoints" / f"step-{step:08d}"
        with open(ckpt / "rank-00000.json") as f:
            epochs.append(json.load(f)["data"]["states"][0]["stream"]["sources"][0]["block_start"][0])
        resumed = tmp_path / f"from-{step}"
        shutil.copytree(ckpt, resumed / "checkpoints" / ckpt.name)
        end = min(step + 2, STEPS)
        assert losses(run(resumed, f"train.steps={end}")) == {s: ref[s] for s in range(step + 1, end + 1)}, step
    assert epochs[-1] >= 1, epochs  # the run crossed an epoch end
