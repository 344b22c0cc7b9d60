"""Runs that survive: exact resume after SIGKILL, resharding across layouts, SIGTERM, a crash
in the middle of a checkpoint write, non-finite losses and a hung collective."""
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.helpers import ROOT, compose, free_port, run_ranks

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
FAST = ["+model=tiny", "train.seq_len=128", "train.batch_size=2", "optim.lr=3e-3", "optim.warmup_steps=3"]


def cmd(nproc, *overrides):
    if nproc == 1:
        return [sys.executable, "launch/pretrain.py", *FAST, *overrides]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
            f"--master_port={free_port()}", "launch/pretrain.py", *FAST, *overrides]


def run(args, timeout=240):
    return subprocess.run(args, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


def train_in_process(*overrides):
    """train() in this process (or in a forked rank of run_ranks), with FAST's settings."""
    from train.loop import train

    return train(compose([*FAST, "logging.wandb.mode=disabled", *overrides]))


def losses(run_dir):
    """{step: (loss, grad_norm)}; a step logged twice (before a kill and after the resume) keeps
    the later line."""
    out = {}
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            if "loss" in row:
                out[row["step"]] = (row["loss"], row["grad_norm"])
    return out


def wait_for_step(run_dir, proc, step, timeout=120):
    path = os.path.join(run_dir, "metrics.jsonl")
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"run ended early: {proc.stderr.read()[-2000:]}")
        if os.path.exists(path) and any(json.loads(x).get("step", 0) >= step for x in open(path) if x.strip()):
            return
        time.sleep(0.2)
    raise TimeoutError(f"step {step} never logged")


def test_sigkill_then_rerun_reproduces_the_uninterrupted_run(tmp_path):
    """2 ranks, the real shard pipeline (2 workers per rank), two training phases (the second at
    twice the sequence length, on its own data stream): killed in the second phase, the rerun
    gives bitwise the uninterrupted losses."""
    steps = ["train.steps=12", "checkpoint.interval=3",
             "phases=[{name: short, steps: 5}, {name: long, seq_len: 256, batch_size: 1}]"]
    run_ranks(train_in_process, 2, *steps, f"run.dir={tmp_path}/ref")  # the uninterrupted reference

    killed = cmd(2, *steps, f"run.dir={tmp_path}/killed")
    proc = subprocess.Popen(killed, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    wait_for_step(tmp_path / "killed", proc, 8)
    os.killpg(proc.pid, signal.SIGKILL)  # no handler runs: as if the node died
    proc.wait()
    again = run(killed)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stdout + again.stderr
    assert "phase long" in again.stdout + again.stderr  # the rerun starts in the second phase
    a, b = losses(tmp_path / "ref"), losses(tmp_path / "killed")
    assert sorted(b) == list(range(1, 13))
    assert a == b  # every step, bitwise (fp32 on CPU)


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


def test_stop_signals_save_where_they_stopped_and_reruns_resume(tmp_path):
    """The default data path (shards, 2 loader workers per rank): torchrun passes a signal to each
    rank's whole process group, workers included. Workers ignore it, the ranks finish the step,
    save and exit; the rerun continues at the next step. First SIGTERM to torchrun, then, on the
    rerun (which resumes), SIGINT to torchrun's process group (what Ctrl-C in a terminal does)."""
    run_dir = tmp_path / "run"
    stopped_at = 0
    for sig in (signal.SIGTERM, signal.SIGINT):
        proc = subprocess.Popen(cmd(2, "train.steps=500", f"run.dir={run_dir}"), cwd=ROOT, env=ENV,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        wait_for_step(run_dir, proc, stopped_at + 2)
        if sig == signal.SIGTERM:
            proc.send_signal(sig)
        else:
            os.killpg(proc.pid, sig)
        out, err = proc.communicate(timeout=120)
        last = max(losses(run_dir))
        saved = [f"step-{stopped_at:08d}"] if stopped_at else []
        assert sorted(os.listdir(run_dir / "checkpoints")) == [*saved, f"step-{last:08d}"], err[-3000:]
        assert "killed by signal" not in err and "KeyboardInterrupt" not in err, err[-3000:]
        assert f"stopped at step {last} of 500" in out + err
        if stopped_at:  # the second run resumed where the first stopped and trained on
            assert f"resumed from {run_dir}/checkpoints/step-{stopped_at:08d}" in out + err
        stopped_at = last
    assert sorted(losses(run_dir)) == list(range(1, last + 1))


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


def test_hung_collective_times_out_naming_rank_and_operation(tmp_path):
    # wandb off: its start-up on rank 0 alone must not race the 2-second collective timeout.
    out = run(cmd(2, "data=text", "train.steps=5", "parallel.timeout_s=2", "train.faults.hang_rank=1",
                  "train.faults.hang_step=2", "train.faults.hang_seconds=6", "logging.wandb.mode=disabled",
                  f"run.dir={tmp_path}"), timeout=120)
    assert out.returncode != 0
    assert "rank 0: counting targets (all-reduce) at step 2 failed" in out.stderr, out.stderr[-3000:]


def test_an_error_on_one_rank_reaches_the_user_with_its_rank(tmp_path):
    """Only rank 1's own file of the checkpoint to start from is damaged: rank 1 fails on it, and
    the user sees that failure, with the rank and the file, not only rank 0's broken collective."""
    run_ranks(train_in_process, 2, "data=text", "train.steps=2", f"run.dir={tmp_path}/first")
    ckpt = tmp_path / "first/checkpoints/step-00000002"
    (ckpt / "rank-00001.json").write_text("{ not json")
    out = run(cmd(2, "data=text", "train.steps=4", "logging.wandb.mode=disabled", f"run.dir={tmp_path}/second",
                  f"checkpoint.load={ckpt}"))
    assert out.returncode != 0
    assert "rank-00001.json" in out.stderr and "Root Cause" in out.stderr, out.stderr[-3000:]
    root_cause = out.stderr.split("Root Cause")[1]
    assert "error: rank " in root_cause and "rank-00001.json" in root_cause, root_cause
