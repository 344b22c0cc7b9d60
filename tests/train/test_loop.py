"""The Trainer's own behaviour, in process: the loss normalisation, metrics.jsonl that holds each
step once whatever happened to earlier attempts, and the progress a person reads."""
import json
import logging

import pytest
import torch

from tests.helpers import compose

TINY = ["+model=tiny", "data=text", "train.seq_len=64", "train.batch_size=2", "logging.wandb.mode=disabled"]


def train(*overrides):
    from train.loop import train as run

    return run(compose([*TINY, *overrides]))


def steps_in(path):
    with open(path) as f:
        return [json.loads(line)["step"] for line in f]


def test_micro_batches_and_padding_do_not_change_the_loss():
    """compute_loss normalises by the global target count: one batch equals the sum of its
    halves as micro-batches, and targets of -100 count for nothing."""
    from model import ModelArgs, Transformer
    from train.loss import compute_loss, count_targets

    torch.manual_seed(0)
    args = ModelArgs(vocab_size=300, dim=32, n_layers=2, n_heads=2, n_kv_heads=1, ffn_hidden=64, expert_hidden=32,
                     n_experts=4, interleave_moe_layer_step=2, router_z_loss_coef=0.01, max_seq_len=64)
    model = Transformer(args)
    model.init_weights()
    tokens = torch.randint(0, 300, (4, 16))
    labels = tokens.roll(-1, 1)
    labels[:, -3:] = -100
    batch = {"tokens": tokens, "labels": labels}
    halves = [{"tokens": tokens[i:i + 2], "labels": labels[i:i + 2]} for i in (0, 2)]
    assert count_targets([batch]).item() == count_targets(halves).item() == 4 * 13

    whole = compute_loss(model, batch, args, global_targets=count_targets([batch]))
    parts = [compute_loss(model, h, args, global_targets=count_targets(halves), grad_accum=2) for h in halves]
    torch.testing.assert_close(sum(p.loss for p in parts), whole.loss, rtol=1e-6, atol=0)
    # The CE part is the mean over targets only: the padded positions change nothing.
    ce = torch.nn.functional.cross_entropy(model(tokens).flatten(0, 1), labels.flatten())
    torch.testing.assert_close(whole.ce_sum / (4 * 13), ce.detach(), rtol=1e-6, atol=0)
    assert whole.routed_slots == 4 * 16 * args.top_k and whole.expert_counts.sum() == 4 * 16


def test_rerun_without_a_checkpoint_logs_each_step_once(tmp_path):
    """A run that never saved (or a new run in a used run.dir) starts at step 0: the earlier
    attempt's lines move to metrics.rewound.jsonl instead of repeating steps 1..N."""
    run_dir = tmp_path / "run"
    train("train.steps=3", f"run.dir={run_dir}", "checkpoint.resume=false")
    train("train.steps=3", f"run.dir={run_dir}", "checkpoint.resume=false")
    assert steps_in(run_dir / "metrics.jsonl") == [1, 2, 3]
    assert steps_in(run_dir / "metrics.rewound.jsonl") == [1, 2, 3]


def test_resume_after_a_kill_keeps_one_line_per_step(tmp_path):
    from train.metrics import MetricsWriter

    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": 1.0}) for s in range(1, 8)] + ['{"step": 8, "lo']  # cut by a kill
    path.write_text("\n".join(lines))
    writer = MetricsWriter(str(tmp_path), True, total_steps=10, start_step=5)
    writer.write({"step": 6, "loss": 0.5, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 1.0})
    writer.close()
    assert steps_in(path) == [1, 2, 3, 4, 5, 6]
    assert (tmp_path / "metrics.rewound.jsonl").read_text().count("\n") == 3  # steps 6, 7 and the cut line


def test_progress_eta_and_summary(tmp_path, caplog):
    run_dir = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="herd"):
        rows = train("train.steps=4", f"run.dir={run_dir}")
    lines = [r.getMessage() for r in caplog.records if r.name == "herd"]
    steps = [line for line in lines if line.startswith("step ")]
    assert len(steps) == 4 and all(" | eta " in line for line in steps[:-1]) and "eta" not in steps[-1]
    summary = lines[-1]
    assert summary.startswith("finished steps 1-4 of 4 in ")
    assert f"last loss {rows[-1]['loss']:.4f}" in summary
    assert f"{run_dir}/checkpoints/step-00000004" in summary and f"{run_dir}/metrics.jsonl" in summary
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="herd"):
        assert train("train.steps=4", f"run.dir={run_dir}") == []  # already done: nothing to train
    assert "nothing to train: the run is at step 4 of 4" in caplog.text


@pytest.mark.parametrize("seconds,text", [(5.4, "5s"), (65, "1m05s"), (3725, "1h02m"), (-1, "0s")])
def test_durations_read_at_a_glance(seconds, text):
    from train.metrics import format_duration

    assert format_duration(seconds) == text


def test_a_batch_without_targets_is_skipped_and_counted(tmp_path):
    """A global batch whose labels are all -100 trains nothing: no NaN loss, no update, a line in
    metrics.jsonl; the next batches train the step. Too many in a row stop the run, naming the data."""
    rows = train("train.steps=4", "train.faults.empty_steps=[2,2]", f"run.dir={tmp_path}/once")
    lines = [json.loads(x) for x in open(tmp_path / "once/metrics.jsonl")]
    assert [line for line in lines if "no_targets_skipped" in line] == [
        {"step": 2, "no_targets_skipped": 1}, {"step": 2, "no_targets_skipped": 2}]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(r["loss"] == r["loss"] for r in rows)
    message = r"4 batches in a row held no target token: the data \(data.path=the pydoc topics\)"
    with pytest.raises(ValueError, match=message):
        train("train.steps=4", "train.max_nonfinite_in_row=3", "train.faults.empty_steps=[2,2,2,2]",
              f"run.dir={tmp_path}/many")


def test_environment_secrets_never_reach_the_run_dir(tmp_path, monkeypatch):
    """A value read with ${oc.env:...} (a token in a pipe: url, say) stays an interpolation in
    config.yaml, and checkpoints hold no copy of it."""
    from data.sample import ensure_sample

    monkeypatch.setenv("HERD_TEST_SHARDS", str(ensure_sample()))
    run_dir = tmp_path / "run"
    train("train.steps=1", "data=sample", "data.num_workers=0", "data.urls=${oc.env:HERD_TEST_SHARDS}",
          f"run.dir={run_dir}")
    secret = str(ensure_sample())
    assert "${oc.env:HERD_TEST_SHARDS}" in (run_dir / "config.yaml").read_text()
    for path in run_dir.rglob("*"):
        if path.is_file() and path.suffix in (".yaml", ".json", ".jsonl"):
            assert secret not in path.read_text(), path


def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog):
    """One flipped byte in a shard of the newest checkpoint: the rerun says so and resumes from
    the one before, reproducing the uninterrupted losses from there."""
    run_dir = tmp_path / "run"
    ref = {r["step"]: r["loss"] for r in train("train.steps=6", "checkpoint.interval=2", f"run.dir={tmp_path}/ref")}
    train("train.steps=4", "checkpoint.interval=2", f"run.dir={run_dir}")
    shard = run_dir / "checkpoints/step-00000004/__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    with caplog.at_level(logging.INFO, logger="herd"):
        rows = train("train.steps=6", "checkpoint.interval=2", f"run.dir={run_dir}")
    assert "not resuming from" in caplog.text and "step-00000004" in caplog.text
    assert f"resumed from {run_dir}/checkpoints/step-00000002 at step 2" in caplog.text
    assert {r["step"]: r["loss"] for r in rows} == {s: ref[s] for s in (3, 4, 5, 6)}


def test_a_new_run_in_a_used_run_dir_keeps_and_exports_its_own_checkpoint(tmp_path):
    """checkpoint.resume=false where an earlier run saved up to step 4 (keep=2): the new run's
    step-1 checkpoint survives pruning, and the export holds the new run's weights."""
    from safetensors.torch import load_file

    run_dir = tmp_path / "run"
    train("train.steps=4", "checkpoint.interval=1", "checkpoint.keep=2", f"run.dir={run_dir}")
    train("train.steps=1", "checkpoint.keep=2", "checkpoint.resume=false", "train.seed=1", f"run.dir={run_dir}",
          f"checkpoint.export_hf={tmp_path}/hf")
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-00000001", "step-00000003",
                                                                            "step-00000004"]
    from train.checkpoint import export_to_hf

    export_to_hf(str(run_dir / "checkpoints/step-00000001"), str(tmp_path / "hf1"))
    exported, expected = load_file(tmp_path / "hf/model.safetensors"), load_file(tmp_path / "hf1/model.safetensors")
    assert all(torch.equal(exported[k], expected[k]) for k in expected)


def test_loss_by_position_bucket(tmp_path):
    """Each target's loss is counted in the bucket of its position in the document; the buckets
    together make up the loss. Rows no longer than the first edge log no buckets."""
    rows = train("train.steps=1", "train.seq_len=128", "logging.position_buckets=[32,64]", f"run.dir={tmp_path}/a")
    row = rows[0]
    assert sorted(k for k in row if k.startswith("loss/")) == ["loss/pos_0-32", "loss/pos_32-64", "loss/pos_64+"]
    # text rows: positions 0..127, every one a target: 32, 32 and 64 targets per row
    mixed = (32 * row["loss/pos_0-32"] + 32 * row["loss/pos_32-64"] + 64 * row["loss/pos_64+"]) / 128
    assert mixed == pytest.approx(row["loss"], rel=1e-6)
    assert len({row["loss/pos_0-32"], row["loss/pos_32-64"], row["loss/pos_64+"]}) == 3
    rows = train("train.steps=1", "train.seq_len=32", "logging.position_buckets=[32,64]", f"run.dir={tmp_path}/b")
    assert not any(k.startswith("loss/") for k in rows[0])
