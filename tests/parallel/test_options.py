"""parallel.compile and parallel.activation_checkpointing change how a step runs, not what it
computes: the losses equal the plain run's."""
import pytest

from tests.helpers import compose

COMMON = ["+model=tiny", "data=text", "train.steps=3", "train.seq_len=128", "train.batch_size=2",
          "logging.wandb.mode=disabled"]


def losses(overrides):
    from train.loop import train

    return [r["loss"] for r in train(compose(COMMON + overrides))]


def test_compile_and_activation_checkpointing_match_eager(tmp_path):
    eager = losses([f"run.dir={tmp_path}/eager"])
    other = losses([f"run.dir={tmp_path}/other", "parallel.compile=true", "parallel.activation_checkpointing=true"])
    # Compiled kernels fuse and reorder fp32 arithmetic: agreement to 1e-5 relative, not bitwise.
    assert other == pytest.approx(eager, rel=1e-5)
