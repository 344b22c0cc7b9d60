"""The real entry point: torchrun smoke test and resume by rerun; training over corrupt shards.
(Config errors: tests/train/test_config.py.)"""
import json
import os
import subprocess
import sys


from tests.helpers import ROOT, compose, free_port

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def run(args, timeout=300):
    return subprocess.run(args, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


def read_metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_torchrun_two_ranks_trains_and_resumes(tmp_path):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", "launch/pretrain.py", "+model=tiny", "train.seq_len=128",
           "train.batch_size=4", "optim.lr=3e-3", "optim.warmup_steps=5", f"run.dir={run_dir}",
           "checkpoint.interval=8"]
    out = run(cmd + ["train.steps=24"])
    assert out.returncode == 0, out.stderr[-3000:]
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, 25))
    for key in ("step", "loss", "lr", "grad_norm", "tokens_per_s"):
        assert key in rows[0]
    assert rows[-1]["loss"] < rows[0]["loss"] - 1.5, (rows[0]["loss"], rows[-1]["loss"])
    assert (run_dir / "config.yaml").exists()
    assert sorted(os.listdir(run_dir / "checkpoints")) == ["step-00000008", "step-00000016", "step-00000024"]
    console = out.stdout + out.stderr  # rank 0's
    assert "step 24/24" in console and "step 23/24" in console and " | eta " in console
    assert "finished steps 1-24 of 24 in " in console and f"checkpoint {run_dir}/checkpoints/step-00000024" in console
    # Hydra made no directories of its own (no per-rank outputs/DATE/TIME)
    assert not (tmp_path / "outputs").exists() and not os.path.exists(os.path.join(ROOT, "outputs", "test"))

    # The same command with more steps continues from step 24, on the longer run's schedule.
    out = run(cmd + ["train.steps=27"])
    assert out.returncode == 0, out.stderr[-3000:]
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, 28))
    assert "resumed from" in out.stdout + out.stderr


def test_torchrun_phase_preset_with_context_parallelism(tmp_path):
    """The CPU phase preset (256 tokens, then a long phase) on 2 ranks that share every row
    (parallel.cp=2), shortened: the switch happens, the long phase trains, both checkpoint."""
    run_dir = tmp_path / "run"
    out = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
               f"--master_port={free_port()}", "launch/pretrain.py", "+model=tiny", "+phase=tiny_long",
               "parallel.cp=2", "train.steps=5", "phases.0.steps=3", "phases.1.seq_len=1024", f"run.dir={run_dir}"])
    assert out.returncode == 0, out.stderr[-3000:]
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert all(r["loss"] == r["loss"] and r["loss"] < 9 for r in rows)
    console = out.stdout + out.stderr
    assert "phase long (2 of 2): steps 4-5, seq_len 1024" in console and "context-parallel groups of 2" in console
    assert sorted(os.listdir(run_dir / "checkpoints")) == ["step-00000003", "step-00000005"]


def test_training_goes_on_over_corrupt_shards(tmp_path):
    """Real shards plus a truncated copy of one, a corrupt image and a file that is no tar: the
    run trains, and metrics.jsonl counts what it skipped."""
    import shutil

    from data.sample import ensure_sample
    from tests.data.datakit import doc_json, write_tar

    shards = tmp_path / "shards"
    shutil.copytree(ensure_sample(), shards)
    first = sorted(shards.glob("*.tar"))[0].read_bytes()
    (shards / "zz-truncated.tar").write_bytes(first[: len(first) // 2])
    write_tar(shards / "zz-badimage.tar", [{"__key__": "bad", "json": doc_json({"text": "x"}, {"image": "jpg"}),
                                            "jpg": b"\xff\xd8\xff not a jpeg"}])
    (shards / "zz-garbage.tar").write_bytes(b"not a tar file" * 100)
    from train.loop import train

    train(compose(["+model=tiny", "train.steps=25", "train.seq_len=128", "train.batch_size=4", "data.shuffle=false",
                   f"data.urls={shards}", f"run.dir={tmp_path}/run", "logging.wandb.mode=disabled"]))
    last = read_metrics(tmp_path / "run")[-1]
    assert last["step"] == 25 and last["data/skipped"] >= 1, last
