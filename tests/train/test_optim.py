"""train/optim.py: the warmup-stable-decay factor at hand-computed points, which parameters AdamW
decays, and the scheduler's lr sequence across a save and resume."""
import json

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from train.config import OptimConfig
from train.optim import build_optimizer, build_scheduler, wsd_factor


def _cfg(**kw):
    return OmegaConf.structured(OptimConfig(**kw))


# 100 steps, 10 of warmup, the last 20 (0.2 x 100) decaying to 0.1: steps 0-9 warm up as
# (step + 1) / 10, steps 10-79 are flat, steps 80-99 decay by 0.9 / 20 = 0.045 each.
WSD = dict(warmup_steps=10, decay_fraction=0.2, min_lr_ratio=0.1)


@pytest.mark.parametrize("step, factor", [
    (0, 0.1),  # first warmup step
    (4, 0.5),
    (9, 1.0),  # last warmup step reaches the peak
    (10, 1.0),  # stable
    (50, 1.0),
    (79, 1.0),  # last stable step
    (80, 0.955),  # first decay step: 1 - 0.045
    (89, 0.55),  # halfway: 1 - 10 x 0.045
    (98, 0.145),
    (99, 0.1),  # last step: min_lr_ratio
    (120, 0.1),  # past the end: stays at min_lr_ratio
])
def test_wsd_factor(step, factor):
    assert wsd_factor(step, 100, _cfg(**WSD)) == pytest.approx(factor, abs=1e-12)


def test_wsd_factor_edge_settings():
    # No warmup: the first step already runs at the peak (and nothing divides by zero).
    no_warmup = _cfg(warmup_steps=0, decay_fraction=0.2, min_lr_ratio=0.0)
    assert [wsd_factor(s, 10, no_warmup) for s in (0, 7, 8, 9)] == pytest.approx([1.0, 1.0, 0.5, 0.0])
    # No decay: flat after warmup, up to the last step and beyond.
    no_decay = _cfg(warmup_steps=2, decay_fraction=0.0, min_lr_ratio=0.0)
    assert [wsd_factor(s, 10, no_decay) for s in (0, 1, 2, 9, 15)] == pytest.approx([0.5, 1.0, 1.0, 1.0, 1.0])
    # All decay: from the first step, 1/10 of the way down to 0.5 each step.
    all_decay = _cfg(warmup_steps=0, decay_fraction=1.0, min_lr_ratio=0.5)
    assert [wsd_factor(s, 10, all_decay) for s in range(10)] == pytest.approx(
        [0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5])
    # Warmup and decay that overlap: the decay waits for the end of warmup and takes the 6 steps
    # left, 1/6 of the way down each; the rate never jumps down mid-warmup.
    overlap = _cfg(warmup_steps=4, decay_fraction=1.0, min_lr_ratio=0.0)
    assert [wsd_factor(s, 10, overlap) for s in range(10)] == pytest.approx(
        [0.25, 0.5, 0.75, 1.0, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6, 0.0])
    # A run shorter than its warmup only warms up.
    assert [wsd_factor(s, 3, _cfg(warmup_steps=20)) for s in range(3)] == pytest.approx([0.05, 0.1, 0.15])


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(5, 4)
        self.proj = nn.Linear(4, 4)  # weight 2-D, bias 1-D
        self.norm = nn.LayerNorm(4)
        self.experts = nn.Parameter(torch.randn(2, 4, 3))  # stacked expert weights are 3-D
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)


def test_build_optimizer_groups_and_hyperparameters():
    torch.manual_seed(0)
    net = _Net()
    cfg = _cfg(lr=3e-2, beta1=0.8, beta2=0.99, eps=1e-6, weight_decay=0.5)
    opt = build_optimizer(net, cfg)
    assert isinstance(opt, torch.optim.AdamW)

    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] == 0.5 for p in g["params"]}
    plain = {id(p) for g in opt.param_groups if g["weight_decay"] == 0.0 for p in g["params"]}
    assert decayed == {id(net.embed.weight), id(net.proj.weight), id(net.experts)}
    assert plain == {id(net.proj.bias), id(net.norm.weight), id(net.norm.bias)}
    assert sum(len(g["params"]) for g in opt.param_groups) == 6  # the frozen layer is left out
    for g in opt.param_groups:
        assert (g["lr"], g["betas"], g["eps"]) == (3e-2, (0.8, 0.99), 1e-6)

    # What the groups do: with all-zero gradients Adam's update is zero, so one step only
    # decays, by the factor 1 - lr x weight_decay, and only the matrices.
    before = {name: p.detach().clone() for name, p in net.named_parameters()}
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for name, p in net.named_parameters():
        if name in ("embed.weight", "proj.weight", "experts"):
            torch.testing.assert_close(p, before[name] * (1 - 3e-2 * 0.5), msg=name)
        else:
            assert torch.equal(p, before[name]), name


# 6 steps at lr 0.5: warmup 2 (0.25, 0.5), flat 1, then 3 decay steps down to 0.2 x 0.5 = 0.1,
# 0.4 / 3 apart: 0.5 - 0.4/3 = 11/30, 0.5 - 0.8/3 = 7/30, 0.1.
SCHED = dict(lr=0.5, warmup_steps=2, decay_fraction=0.5, min_lr_ratio=0.2)
LRS = [0.25, 0.5, 0.5, 11 / 30, 7 / 30, 0.1]


def _step(opt, sched):
    """One training step as the loop takes it: the lr the step uses, then optimizer and schedule."""
    lr = opt.param_groups[0]["lr"]
    assert all(g["lr"] == lr for g in opt.param_groups)
    for p in (p for g in opt.param_groups for p in g["params"]):
        p.grad = torch.ones_like(p)
    opt.step()
    sched.step()
    return lr


def test_scheduler_sequence_and_resume():
    cfg = _cfg(**SCHED)
    opt = build_optimizer(nn.Linear(3, 2), cfg)
    sched = build_scheduler(opt, 6, cfg)
    assert [_step(opt, sched) for _ in range(6)] == pytest.approx(LRS, abs=1e-12)

    # Stop after 3 steps, save as a checkpoint does (the scheduler's state as JSON), resume in a
    # fresh optimizer and scheduler: the remaining steps get the remaining lrs.
    opt = build_optimizer(nn.Linear(3, 2), cfg)
    sched = build_scheduler(opt, 6, cfg)
    first = [_step(opt, sched) for _ in range(3)]
    saved_sched = json.loads(json.dumps(sched.state_dict()))
    saved_opt = opt.state_dict()

    opt2 = build_optimizer(nn.Linear(3, 2), cfg)
    sched2 = build_scheduler(opt2, 6, cfg)
    opt2.load_state_dict(saved_opt)  # the optimizer state carries the current lr, as in load_checkpoint
    sched2.load_state_dict(saved_sched)
    rest = [_step(opt2, sched2) for _ in range(3)]
    assert first + rest == pytest.approx(LRS, abs=1e-12)
    assert sched2.get_last_lr()[0] == pytest.approx(0.1)  # past the end: min_lr_ratio x lr
