"""Which checkpoint a run resumes from and which it prunes: the newest one that verifies, with a
warning for each newer one skipped (the same choice on every rank), and never another
trajectory's newer checkpoint."""
import os

from tests.helpers import run_ranks
from train.checkpoint import Checkpointer, find_resume_checkpoint, list_checkpoints

from .test_checkpoint import setup, take_steps
from .test_checkpoint_safety import flip_byte, saved, tensor_offset


def names(run_dir):
    return [os.path.basename(p) for p in list_checkpoints(str(run_dir))]


def test_resume_skips_damaged_checkpoints_and_says_why(tmp_path, caplog):
    saved(tmp_path, steps=(1, 2, 3))
    root = tmp_path / "checkpoints"
    shard, offset, length = tensor_offset(str(root / "step-00000003"), "exp_avg")
    flip_byte(shard, offset + length // 2)
    with open(root / "step-00000002/train_state.json", "r+b") as f:
        f.truncate(20)
    with caplog.at_level("WARNING", logger="herd"):
        assert find_resume_checkpoint(str(tmp_path)) == str(root / "step-00000001")
    warnings = [r.message for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 2
    assert warnings[0].startswith(f"rank 0: not resuming from {root}/step-00000003: {shard} does not match its "
                                  "checksum")
    assert warnings[1].startswith(f"rank 0: not resuming from {root}/step-00000002: {root}/step-00000002/"
                                  "train_state.json is not valid JSON")
    # with every checkpoint damaged: none, and a fresh start
    os.remove(root / "step-00000001/rank-00000.json")
    assert find_resume_checkpoint(str(tmp_path)) is None


def _two_ranks_resume(run_dir):
    from parallel import init_distributed
    from train.integrity import CheckpointError, read_manifest, share_of_files, verify_checkpoint

    env = init_distributed("cpu")
    model, opt, state = setup()
    ck = Checkpointer(run_dir, keep=3, rank=env.rank, async_save=True)
    for step in (1, 2):
        take_steps(model, opt, state, 1)
        ck.save(step, model, opt, state)
    ck.wait()
    sizes = {n: e["bytes"] for n, e in read_manifest(ck.last_saved).items()}
    (shard,) = [n for n in share_of_files(list(sizes), sizes, 1, 2) if n.endswith(".distcp")]  # rank 1 hashes it
    env.barrier()
    if env.rank == 0:
        file = os.path.join(ck.last_saved, shard)
        flip_byte(file, os.path.getsize(file) // 2)
    env.barrier()
    try:
        verify_checkpoint(ck.last_saved, env.rank, env.world_size)
        sees_damage = False
    except CheckpointError:
        sees_damage = True
    return sees_damage, find_resume_checkpoint(run_dir, env.rank, env.world_size, env.all_reduce)


def test_ranks_agree_on_the_checkpoint_even_when_one_sees_the_damage(tmp_path):
    """2 ranks, async saves: each hashes its half of the files; the rank that finds the flipped
    byte vetoes the checkpoint for both."""
    step_1 = str(tmp_path / "checkpoints/step-00000001")
    assert run_ranks(_two_ranks_resume, 2, str(tmp_path)) == [(False, step_1), (True, step_1)]


def test_a_fresh_run_in_a_used_run_dir_keeps_its_own_checkpoints(tmp_path):
    """checkpoint.resume=false where an earlier run saved steps 2 and 4 (keep=2): the new run's
    checkpoints are pruned among themselves, the other trajectory's newer step-4 is never touched,
    and a rerun resumes the new trajectory (the most recently saved), not the higher step."""
    saved(tmp_path, steps=(2, 4), keep=2)
    model, opt, state = setup(seed=1)
    ck = Checkpointer(str(tmp_path), keep=2, rank=0)
    take_steps(model, opt, state, 1)
    assert ck.save(1, model, opt, state) == ck.last_saved == str(tmp_path / "checkpoints/step-00000001")
    assert names(tmp_path) == ["step-00000001", "step-00000002", "step-00000004"]
    assert find_resume_checkpoint(str(tmp_path)) == ck.last_saved
    for step in (2, 3):  # step 2 replaces the old run's step 2
        take_steps(model, opt, state, 1)
        ck.save(step, model, opt, state)
    assert names(tmp_path) == ["step-00000002", "step-00000003", "step-00000004"]
    assert find_resume_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoints/step-00000003")

    # The rerun resumes step 3: checkpoints up to it are its history; step 4 is still not its own.
    resumed = Checkpointer(str(tmp_path), keep=2, rank=0)
    resumed.resumed_from(3)
    for step in (5, 6):
        take_steps(model, opt, state, 1)
        resumed.save(step, model, opt, state)
    assert names(tmp_path) == ["step-00000004", "step-00000005", "step-00000006"]
    assert find_resume_checkpoint(str(tmp_path)) == resumed.last_saved
