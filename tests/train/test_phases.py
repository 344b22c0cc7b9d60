"""Training phases (train/phases.py): what a run is made of, the switch at a step boundary with
a checkpoint, continuity of the optimizer and the schedule, and exact resume on either side of
the switch and exactly at it."""
import json
import re
import shutil

import pytest
import torch

from tests.helpers import compose

# 3 steps at 64 tokens x 2 rows, then 3 at 128 x 2 with their own peak lr and warmup.
PHASES = "phases=[{name: short, steps: 3, seq_len: 64}, {name: long, seq_len: 128, lr: 5e-4, warmup_steps: 1}]"
RUN = ["+model=tiny", "data=text", "train.seq_len=64", "train.batch_size=2", "train.steps=6", "optim.lr=2e-3",
       "optim.warmup_steps=2", "optim.decay_fraction=0", "logging.wandb.mode=disabled", PHASES]


def train(*overrides):
    from train.loop import train as run

    return run(compose([*RUN, *overrides]))


def resolve(overrides):
    from train.config import data_args, model_args
    from train.phases import resolve_phases

    cfg = compose(overrides)
    return resolve_phases(cfg, model_args(cfg), data_args(cfg))


def test_presets_and_command_line_phases():
    short, long = resolve(RUN)
    assert (short.start, short.end, short.seq_len, short.lr) == (0, 3, 64, 2e-3)
    assert (long.start, long.end, long.seq_len, long.lr, long.warmup_steps) == (3, 6, 128, 5e-4, 1)
    assert short.data_seed == 0 and long.data_seed != 0  # the second phase's data has its own seed
    pre, long = resolve(["+model=tiny", "+phase=tiny_long"])
    assert (pre.end, long.end, long.seq_len, long.batch_size, long.data.kind) == (100, 150, 4096, 1, "text")
    pre, long = resolve(["+model=scout", "+phase=llama4", "phases.1.data.urls=/long"])
    assert (pre.seq_len, long.seq_len, long.data.resolved_sources()[0].urls) == (8192, 262144, "/long")
    assert [p.name for p in resolve(["+model=tiny"])] == ["train"]  # no phases: one made of train.*
    for preset in ("tiny_passkey", "tiny_passkey_rope"):
        short, long = resolve(["+model=tiny", f"+phase={preset}"])
        assert (short.end, short.seq_len, long.end, long.seq_len) == (1000, 256, 1200, 4096)
        assert (long.data.kind, long.data.passkey_loss) == ("passkey", "key")
    from train.config import model_args
    rope = model_args(compose(["+model=tiny", "+phase=tiny_passkey_rope"]))
    assert (rope.nope_layer_interval, rope.attention_chunk_size) == (0, None)  # RoPE in every layer


@pytest.mark.parametrize("override,message", [
    ("phases.1.steps=2", "the phases cover 5 steps but train.steps=6"),
    ("phases.0.steps=null", "only the last phase may run until train.steps"),
    ("phases.1.seq_len=8192", "seq_len=8192 exceeds model.max_seq_len=4096"),
    ("+phases.1.model.dim=64", "model.dim cannot change between phases"),
    ("+phases.1.data.urlz=x", "phases[1] (long): data: Key 'urlz' not in 'DataArgs'"),
    ("phases.1.name=short", "phase names must differ"),
])
def test_bad_phases_are_named(override, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        resolve([*RUN, override])


def test_switch_keeps_the_optimizer_and_schedule_and_resumes_exactly(tmp_path):
    from train.loop import Trainer

    ref_dir = tmp_path / "ref"
    trainer = Trainer(compose([*RUN, f"run.dir={ref_dir}", "checkpoint.interval=1", "checkpoint.keep=6"]))
    rows = trainer.run()
    # One AdamW across both phases: its moments and step count carried over the switch.
    assert {int(s["step"]) for s in trainer.optimizer.state.values()} == {6}
    assert [(r["step"], r["phase"]) for r in rows] == [(1, "short"), (2, "short"), (3, "short"), (4, "long"),
                                                        (5, "long"), (6, "long")]
    # Each phase's own warmup-stable segment, at its own peak (the logged lr is the step's).
    assert [r["lr"] for r in rows] == pytest.approx([1e-3, 2e-3, 2e-3, 5e-4, 5e-4, 5e-4])
    # Target tokens per step follow the phase's rows: 2 x 64, then 2 x 128.
    tokens = [b["tokens"] - a["tokens"] for a, b in zip([{"tokens": 0}] + rows, rows)]
    assert tokens == [128, 128, 128, 256, 256, 256]
    # The switch checkpoint is the short phase's last step, tagged with it.
    state = json.loads((ref_dir / "checkpoints/step-00000003/train_state.json").read_text())
    assert (state["step"], state["phase"]) == (3, 0)

    ref = {r["step"]: (r["loss"], r["grad_norm"]) for r in rows}
    for step in (1, 2, 3, 4, 5):  # either side of the switch, and exactly at it (3)
        ckpt = ref_dir / "checkpoints" / f"step-{step:08d}"
        resumed = tmp_path / f"from-{step}"
        shutil.copytree(ckpt, resumed / "checkpoints" / ckpt.name)
        again = {r["step"]: (r["loss"], r["grad_norm"]) for r in train(f"run.dir={resumed}")}
        assert again == {s: ref[s] for s in range(step + 1, 7)}, step


def test_rope_settings_change_only_when_a_phase_says_so():
    base, = resolve(["+model=tiny"])
    short, long = resolve([*RUN, "+phases.1.model.rope_scaling_factor=8.0"])
    assert short.model.rope_scaling_factor == base.model.rope_scaling_factor == 4.0
    assert long.model.rope_scaling_factor == 8.0 and long.model.dim == base.model.dim
    from model.layers import rope_inv_freq

    assert not torch.equal(rope_inv_freq(short.model), rope_inv_freq(long.model))


def test_the_first_phase_rope_settings_reach_the_model(tmp_path):
    from train.loop import Trainer

    trainer = Trainer(compose([*RUN, "+phases.0.model.rope_scaling_factor=2.0", f"run.dir={tmp_path}"]))
    assert trainer.model.args.rope_scaling_factor == 2.0
    trainer.run()
    assert trainer.model.args.rope_scaling_factor == 4.0  # the second phase takes the run's value again
