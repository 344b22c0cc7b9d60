"""Multi-node launch on one machine: two torchrun "nodes" meeting through c10d rendezvous on
loopback, the Slurm batch script driven through stand-ins for srun and scontrol, and the Hydra
sweep configs (per-job run directories, the submitit launcher's schema)."""
import contextlib
import json
import os
import signal
import stat
import subprocess
import sys
import time

import pytest

from tests.helpers import ROOT, free_port

SBATCH = os.path.join(ROOT, "launch", "slurm", "pretrain.sbatch")
TINY = ["+model=tiny", "data=text", "train.seq_len=64", "train.batch_size=4"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline"}

# srun stand-in: drops srun's own options, then runs the command once per node, as Slurm would,
# all on this machine.
FAKE_SRUN = """#!/bin/bash
while [[ $1 == --* ]]; do shift; done
printf '%s\\n' "$@" > "$FAKE_SLURM_DIR/srun_command"
[[ -n ${FAKE_SRUN_DRY:-} ]] && exit 0
pids=()
for ((node = 0; node < SLURM_NNODES; node++)); do
    SLURM_NODEID=$node SLURM_PROCID=$node "$@" > "$FAKE_SLURM_DIR/node$node.log" 2>&1 &
    pids+=($!)
done
rc=0
for pid in "${pids[@]}"; do wait "$pid" || rc=$?; done
exit $rc
"""
FAKE_SCONTROL = """#!/bin/bash
echo "$*" >> "$FAKE_SLURM_DIR/scontrol_calls"
if [[ $1 == show && $2 == hostnames ]]; then printf '127.0.0.1\\nnode-b\\n'; fi
"""


def read_metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if "loss" in r]


def test_two_nodes_rendezvous_on_loopback(tmp_path):
    run_dir = tmp_path / "run"
    port = free_port()
    procs = []
    for node_rank in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
               f"--node_rank={node_rank}", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}",
               "--rdzv_id=herd-two-nodes", "launch/pretrain.py", *TINY, "train.steps=3", f"run.dir={run_dir}"]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=120)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3]
    assert "2 rank(s)" in outs[0] + outs[1]
    assert os.listdir(run_dir / "checkpoints") == ["step-00000003"]


@pytest.fixture
def fake_slurm(tmp_path):
    """A PATH with srun and scontrol stand-ins, and the variables Slurm sets for a 2-node job."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod((bin_dir / name).stat().st_mode | stat.S_IEXEC)
    return {**ENV, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "FAKE_SLURM_DIR": str(tmp_path),
            "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "tiny-2n", "SLURM_JOB_NODELIST": "node-[a-b]",
            "SLURM_NNODES": "2", "SLURM_GPUS_ON_NODE": "8", "SLURM_CPUS_PER_TASK": "2"}


def sbatch(env, *overrides):
    return subprocess.run(["bash", SBATCH, *overrides], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)


def test_sbatch_script_parses_and_sets_the_slurm_flags():
    assert subprocess.run(["bash", "-n", SBATCH]).returncode == 0
    with open(SBATCH) as f:
        text = f.read()
    for flag in ("#SBATCH --nodes=", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --requeue", "#SBATCH --signal=USR2@300", "#SBATCH --open-mode=append",
                 "--rdzv_backend=c10d", '--rdzv_id="$SLURM_JOB_ID"', '--nnodes="$SLURM_NNODES"',
                 "SIGUSR2", "launch/pretrain.py"):
        assert flag in text, flag


def test_sbatch_builds_one_torchrun_command_per_node(tmp_path, fake_slurm):
    env = {**fake_slurm, "FAKE_SRUN_DRY": "1"}
    out = sbatch(env, "+model=scout", "optim.lr=3e-4")
    assert out.returncode == 0, out.stderr
    cmd = (tmp_path / "srun_command").read_text().splitlines()
    assert cmd[1:3] == ["-m", "torch.distributed.run"]
    for arg in ("--nnodes=2", "--nproc_per_node=8", "--rdzv_backend=c10d", "--rdzv_endpoint=127.0.0.1:29500",
                "--rdzv_id=4242"):
        assert arg in cmd, arg
    # the overrides pass through untouched, and run.dir follows the job name (the same after a requeue)
    assert cmd[-4:] == ["launch/pretrain.py", "+model=scout", "optim.lr=3e-4", "run.dir='outputs/tiny-2n'"]
    # a run.dir of the caller's wins
    out = sbatch(env, "+model=scout", "run.dir=/scratch/mine")
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "srun_command").read_text().splitlines()[-1] == "run.dir=/scratch/mine"

    # Job names and HERD_RUN_DIR values with override syntax in them stay literal paths.
    from tests.helpers import compose

    for extra, expected in (({"SLURM_JOB_NAME": "my job,x=${oc.env:HOME}"}, "outputs/my_job_x___oc.env_HOME_"),
                            ({"HERD_RUN_DIR": "/scratch/it's a run, x=${oc.env:HOME}"},
                             "/scratch/it's a run, x=${oc.env:HOME}")):
        out = sbatch({**env, **extra}, "+model=tiny")
        assert out.returncode == 0, out.stderr
        override = (tmp_path / "srun_command").read_text().splitlines()[-1]
        assert compose(["+model=tiny", override]).run.dir == expected, override


def _children(pid: int) -> list[int]:
    kids = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True)
    return [int(x) for x in kids.stdout.split()]


def _descendants(pid: int) -> list[int]:
    out, stack = [], [pid]
    while stack:
        found = _children(stack.pop())
        out += found
        stack += found
    return out


def test_sbatch_job_saves_and_requeues_on_sigusr2_then_resumes(tmp_path, fake_slurm):
    run_dir = tmp_path / "run"
    env = {**fake_slurm, "HERD_NPROC_PER_NODE": "1", "HERD_RDZV_PORT": str(free_port()),
           "HERD_PYTHON": sys.executable, "HERD_RUN_DIR": str(run_dir)}
    job = subprocess.Popen(["bash", SBATCH, *TINY, "train.steps=1000"], cwd=ROOT, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = tmp_path / "node0.log"
    try:
        deadline = time.monotonic() + 90
        while not (log.exists() and "step 2/" in log.read_text()):
            assert job.poll() is None and time.monotonic() < deadline, job.communicate()[0]
            time.sleep(0.2)
        # Slurm's --signal reaches every process of the step (each node's torchrun and its ranks),
        # neither srun nor the batch shell.
        (srun,) = _children(job.pid)  # the batch shell's one child
        for pid in _descendants(srun):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGUSR2)
        job.communicate(timeout=90)
    finally:
        for pid in _descendants(job.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    logs = log.read_text() + (tmp_path / "node1.log").read_text()
    (saved,) = os.listdir(run_dir / "checkpoints")  # the checkpoint the signal asked for
    stopped_at = int(saved.split("-")[1])
    assert 2 <= stopped_at < 1000, logs[-3000:]
    assert "requeue 4242" in (tmp_path / "scontrol_calls").read_text(), logs[-3000:]

    # Slurm runs the requeued job's script again, same job id and name: it resumes.
    env["HERD_RDZV_PORT"] = str(free_port())
    out = sbatch({**env, "SLURM_RESTART_COUNT": "1"}, *TINY, f"train.steps={stopped_at + 2}")
    logs = log.read_text() + (tmp_path / "node1.log").read_text()
    assert out.returncode == 0, out.stdout + out.stderr + logs[-3000:]
    assert [r["step"] for r in read_metrics(run_dir)][-3:] == [stopped_at, stopped_at + 1, stopped_at + 2]
    assert f"resumed from {run_dir / 'checkpoints' / saved}" in logs


def test_a_sweep_gives_every_job_its_own_run_dir(tmp_path):
    sweep = tmp_path / "sweep"
    out = subprocess.run([sys.executable, "launch/pretrain.py", "-m", *TINY, "train.steps=1", "optim.lr=1e-3,3e-4",
                          f"hydra.sweep.dir={sweep}", "run.dir=${hydra:sweep.dir}/${hydra:sweep.subdir}"],
                         cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    for job, lr in ((0, 1e-3), (1, 3e-4)):
        assert (sweep / str(job) / "checkpoints" / "step-00000001").is_dir()
        assert f"lr: {lr}" in (sweep / str(job) / "config.yaml").read_text()


def test_slurm_launcher_config_fits_the_submitit_schema():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    import hydra
    from hydra.core.global_hydra import GlobalHydra

    from train.config import register_configs

    register_configs()
    GlobalHydra.instance().clear()
    with hydra.initialize_config_dir(config_dir=os.path.join(ROOT, "configs"), version_base="1.3"):
        cfg = hydra.compose("pretrain", overrides=["+model=tiny", "hydra/launcher=slurm", "hydra.launcher.nodes=2"],
                            return_hydra_config=True)
        launcher = cfg.hydra.launcher
        assert launcher._target_.endswith("SlurmLauncher")
        assert launcher.nodes == 2 and launcher.signal_delay_s == 300 and launcher.additional_parameters.requeue
        with pytest.raises(Exception, match="partitionn"):  # the plugin's schema rejects a typo
            hydra.compose("pretrain", overrides=["+model=tiny", "hydra/launcher=slurm", "hydra.launcher.partitionn=x"],
                          return_hydra_config=True)
    GlobalHydra.instance().clear()
