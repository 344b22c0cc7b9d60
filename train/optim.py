"""AdamW and the warmup-stable-decay learning-rate schedule."""
from __future__ import annotations

import torch
from torch import nn

from model import ModelArgs

from . import metap
from .config import OptimConfig


def build_optimizer(model: nn.Module, cfg: OptimConfig, args: ModelArgs | None = None) -> torch.optim.AdamW:
    """Weight decay on matrices only; norms (1-D) are not decayed. With optim.metap (and the
    model's `args`), one group per set of MetaP multipliers (train/metap.py)."""
    if cfg.metap:
        if args is None:
            raise ValueError("optim.metap=true: build_optimizer needs the model's ModelArgs")
        groups = metap.param_groups(model, args, cfg.lr, cfg.weight_decay, cfg.eps)
    else:
        decay, no_decay = [], []
        for p in model.parameters():
            if p.requires_grad:
                (decay if p.dim() >= 2 else no_decay).append(p)
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, foreach=True)


def wsd_factor(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Multiplier of optim.lr at `step` (0-based): linear warmup, constant, then a linear decay
    over the last `decay_fraction` of the run down to `min_lr_ratio` (starting no earlier than
    the end of warmup)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    decay_steps = int(round(cfg.decay_fraction * total_steps))
    # A run shorter than warmup + decay decays over what warmup leaves (never before it ends).
    decay_start = max(total_steps - decay_steps, cfg.warmup_steps)
    decay_steps = total_steps - decay_start
    if decay_steps == 0 or step < decay_start:
        return 1.0
    progress = (step - decay_start + 1) / decay_steps
    return 1.0 - (1.0 - cfg.min_lr_ratio) * min(progress, 1.0)


def build_scheduler(opt: torch.optim.Optimizer, total_steps: int, cfg: OptimConfig, phases=None):
    """LambdaLR over optim.lr: one warmup-stable-decay over the run, or, with `phases`
    (train/phases.py), one per phase, scaled to the phase's peak lr."""
    if phases is None:
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: wsd_factor(s, total_steps, cfg))

    def factor(step: int) -> float:
        phase = next((p for p in phases if step < p.end), phases[-1])
        return phase.lr / cfg.lr * wsd_factor(step - phase.start, phase.steps, phase)

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def schedule_at(scheduler: torch.optim.lr_scheduler.LambdaLR, step: int) -> None:
    """Put the schedule where it is after `step` optimizer steps, with the learning rate the
    *current* config gives there (the value LambdaLR would have computed, bit for bit). The
    schedule is a function of the step, so a resumed run follows the config it resumes with: a
    longer train.steps moves the decay instead of training at the old run's final rate."""
    scheduler.last_epoch = step
    lrs = [base * fn(step) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs
