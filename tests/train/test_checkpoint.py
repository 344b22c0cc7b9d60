"""train/checkpoint.py: a checkpoint restores model, optimizer and TrainState exactly, is written
atomically, keeps the last K, and moves between layouts (the data position as far as it can)."""
import json
import os

import pytest
import torch

from model import ModelArgs, Transformer
from tests.helpers import run_ranks
from train.checkpoint import Checkpointer, latest_checkpoint, list_checkpoints, load_checkpoint
from train.optim import build_optimizer, build_scheduler
from train.state import TrainState

ARGS = dict(vocab_size=300, dim=32, n_layers=2, n_heads=2, n_kv_heads=1, ffn_hidden=64, expert_hidden=32,
            n_experts=4, interleave_moe_layer_step=2, max_seq_len=64)


class Cursor:
    """A data source whose position is one integer per rank."""

    def __init__(self, position=0, state_is_global=False):
        self.position, self.state_is_global = position, state_is_global

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state):
        if "position" not in state:
            raise ValueError("no position")
        self.position = state["position"]


def setup(seed=0, data=None, steps=10):
    from omegaconf import OmegaConf

    from train.config import OptimConfig

    torch.manual_seed(seed)
    model = Transformer(ModelArgs(**ARGS))
    model.init_weights()
    cfg = OmegaConf.structured(OptimConfig(lr=1e-3, warmup_steps=2, decay_fraction=0.5))
    opt = build_optimizer(model, cfg)
    state = TrainState(build_scheduler(opt, steps, cfg), data or Cursor(), rank=int(os.environ.get("RANK", 0)))
    return model, opt, state


def take_steps(model, opt, state, n):
    for _ in range(n):
        tokens = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(state.step))
        model(tokens).square().mean().backward()
        opt.step()
        state.scheduler.step()
        opt.zero_grad()
        state.step += 1
        state.tokens += 32
        state.data.position += 7


def test_round_trip_restores_everything_exactly(tmp_path):
    model, opt, state = setup()
    take_steps(model, opt, state, 3)
    Checkpointer(str(tmp_path), keep=3, rank=0).save(3, model, opt, state)
    path = latest_checkpoint(str(tmp_path))
    assert path.endswith("step-00000003") and not os.path.exists(path + ".tmp")
    with open(os.path.join(path, "train_state.json")) as f:
        saved = json.load(f)
    assert (saved["step"], saved["tokens"]) == (3, 96) and "data" not in saved  # data is per rank
    assert json.load(open(os.path.join(path, "rank-00000.json"))) == {"data": {"position": 21}}

    fresh_model, fresh_opt, fresh_state = setup(seed=1)
    assert not torch.equal(fresh_model.output.weight, model.output.weight)
    load_checkpoint(path, fresh_model, fresh_opt, fresh_state)
    for (name, a), b in zip(model.state_dict().items(), fresh_model.state_dict().values()):
        assert torch.equal(a, b), name
    assert (fresh_state.step, fresh_state.tokens, fresh_state.data.position) == (3, 96, 21)
    assert fresh_state.scheduler.get_last_lr() == state.scheduler.get_last_lr()
    assert [g["lr"] for g in fresh_opt.param_groups] == [g["lr"] for g in opt.param_groups]
    # Both continue identically: the optimizer moments and the schedule came back too.
    take_steps(model, opt, state, 2)
    take_steps(fresh_model, fresh_opt, fresh_state, 2)
    for (name, a), b in zip(model.state_dict().items(), fresh_model.state_dict().values()):
        assert torch.equal(a, b), name
    assert fresh_state.scheduler.get_last_lr() == state.scheduler.get_last_lr()


def test_a_longer_run_resumes_on_its_own_schedule(tmp_path):
    """Saved at step 4 of 6 (decaying), resumed with train.steps=10: the next step trains at the
    10-step schedule's rate (stable, 1e-3), not at the 6-step run's decayed one."""
    model, opt, state = setup(steps=6)
    take_steps(model, opt, state, 4)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3 / 3)  # decaying over steps 4..6
    Checkpointer(str(tmp_path), keep=1, rank=0).save(3, model, opt, state)
    model, opt, state = setup(steps=10)
    load_checkpoint(latest_checkpoint(str(tmp_path)), model, opt, state)
    assert state.scheduler.get_last_lr() == [1e-3, 1e-3] and opt.param_groups[0]["lr"] == 1e-3
    take_steps(model, opt, state, 1)  # the 10-step run decays over its last 5 steps
    assert opt.param_groups[0]["lr"] == pytest.approx(0.8e-3)


def test_weights_only_load_leaves_optimizer_and_state_alone(tmp_path):
    model, opt, state = setup()
    take_steps(model, opt, state, 2)
    Checkpointer(str(tmp_path), keep=1, rank=0).save(2, model, opt, state)
    fresh_model, fresh_opt, fresh_state = setup(seed=1)
    load_checkpoint(latest_checkpoint(str(tmp_path)), fresh_model)
    assert torch.equal(fresh_model.output.weight, model.output.weight)
    assert fresh_state.step == 0 and not fresh_opt.state


def test_keep_prunes_the_oldest_and_listing_ignores_partial_writes(tmp_path):
    model, opt, state = setup()
    ck = Checkpointer(str(tmp_path), keep=2, rank=0)
    for step in (1, 2, 10):
        ck.save(step, model, opt, state)
    root = tmp_path / "checkpoints"
    (root / "step-00000011.tmp").mkdir()  # a write some crash interrupted
    (root / "notes").mkdir()
    assert [os.path.basename(p) for p in list_checkpoints(str(tmp_path))] == ["step-00000002", "step-00000010"]
    Checkpointer(str(tmp_path), keep=2, rank=0)  # a new run clears interrupted writes
    assert sorted(os.listdir(root)) == ["notes", "step-00000002", "step-00000010"]


def test_missing_or_partial_checkpoint_is_a_clear_error(tmp_path):
    model, _, _ = setup()
    with pytest.raises(FileNotFoundError, match="not a complete herd checkpoint"):
        load_checkpoint(str(tmp_path), model)


def _save_on_two_ranks(run_dir, global_state):
    from parallel import init_distributed

    init_distributed("cpu")
    model, opt, state = setup(data=Cursor(100 + int(os.environ["RANK"]), global_state))
    Checkpointer(run_dir, keep=1, rank=int(os.environ["RANK"])).save(5, model, opt, state)


@pytest.mark.parametrize("global_state", [True, False])
def test_data_position_across_world_sizes(tmp_path, caplog, global_state):
    """Saved by 2 ranks, loaded by 1: rank 0's own position always; a source whose position is
    global (the text source) also gives it to ranks the checkpoint never had, while a per-rank
    stream restarts from its seed there, and says so."""
    run_ranks(_save_on_two_ranks, 2, str(tmp_path), global_state)
    path = latest_checkpoint(str(tmp_path))
    assert sorted(f for f in os.listdir(path) if f.endswith(".json")) == ["rank-00000.json", "rank-00001.json",
                                                                          "train_state.json"]
    model, opt, state = setup(data=Cursor(0, global_state))
    load_checkpoint(path, model, opt, state)
    assert state.data.position == 100 and state.step == 0  # setup() saved step 0's state
    model, opt, state = setup(data=Cursor(0, global_state))
    state.rank = 2  # a rank the 2-rank checkpoint has no file for
    with caplog.at_level("WARNING", logger="herd"):
        load_checkpoint(path, model, opt, state)
    if global_state:
        assert state.data.position == 100 and "restarts" not in caplog.text
    else:
        assert state.data.position == 0 and "restarts from its seed" in caplog.text
