"""Runs stopped from outside: SIGKILL then a rerun that reproduces the uninterrupted losses,
SIGTERM and SIGINT through torchrun, a hung collective, and one rank's error reaching the user."""
import os
import signal
import subprocess

from tests.helpers import ROOT, run_ranks
from tests.train.procs import ENV, cmd, losses, run, train_in_process, wait_for_step


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
