"""The real entry point: torchrun smoke test, resume by rerun, and training over corrupt shards.
(Config errors: tests/train/test_config.py.)"""
import json
import os
import subprocess
import sys


from tests.helpers import ROOT, free_port

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
           "checkpoint.interval=10"]
    out = run(cmd + ["train.steps=30"])
    assert out.returncode == 0, out.stderr[-3000:]
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, 31))
    for key in ("step", "loss", "lr", "grad_norm", "tokens_per_s"):
        assert key in rows[0]
    assert rows[-1]["loss"] < rows[0]["loss"] - 2.0, (rows[0]["loss"], rows[-1]["loss"])
    assert (run_dir / "config.yaml").exists()
    assert sorted(os.listdir(run_dir / "checkpoints")) == ["step-00000010", "step-00000020", "step-00000030"]
    assert "step 30/30" in out.stdout + out.stderr  # rank 0's console line
    # Hydra made no directories of its own (no per-rank outputs/DATE/TIME)
    assert not (tmp_path / "outputs").exists() and not os.path.exists(os.path.join(ROOT, "outputs", "test"))

    # The same command with more steps continues from step 30.
    out = run(cmd + ["train.steps=35"])
    assert out.returncode == 0, out.stderr[-3000:]
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows][-5:] == [31, 32, 33, 34, 35]
    assert "resumed from" in out.stdout + out.stderr


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
    out = run([sys.executable, "launch/pretrain.py", "+model=tiny", "train.steps=25", "train.seq_len=128",
               "train.batch_size=4", "data.shuffle=false", f"data.urls={shards}", f"run.dir={tmp_path}/run",
               "logging.wandb.mode=disabled"])
    assert out.returncode == 0, out.stderr[-3000:]
    last = read_metrics(tmp_path / "run")[-1]
    assert last["step"] == 25 and last["data/skipped"] >= 1, last
