"""Training phases: a run is a list of phases run one after the other, each with its own sequence
length, batch, data and learning-rate segment; Llama 4 pre-trained at 8K and then mid-trained
on long documents at 256K (configs/phase/).

Without `phases` a run is one phase made of train.* and optim.*. With them, phase i covers
optimizer steps [start, end) (`steps` each; the last may leave it null to run to train.steps),
and every field left null takes the run's value. What carries over a switch: the weights, the
optimizer's moments, the step and token counters. What starts anew: the data stream (the
phase's own source and seed) and the learning-rate segment (a warmup-stable-decay of its own,
peaking at the phase's lr). The switch happens at a step boundary with a checkpoint of the last
step of the phase that ends.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from omegaconf import MISSING, OmegaConf

from data.args import DataArgs
from model import ModelArgs

# Model fields a phase may change: how positions are encoded, nothing that shapes a weight.
PHASE_MODEL_FIELDS = ("rope_theta", "rope_scaling_factor", "rope_low_freq_factor", "rope_high_freq_factor",
                      "rope_original_max_seq_len")


@dataclass
class PhaseConfig:
    """One entry of `phases` (train/config.py). Null fields take the run's train.*/optim.* value."""

    name: str = MISSING
    steps: int | None = None  # optimizer steps in this phase; null (last phase only): until train.steps
    seq_len: int | None = None
    batch_size: int | None = None
    grad_accum: int | None = None
    lr: float | None = None  # the segment's peak learning rate
    warmup_steps: int | None = None
    decay_fraction: float | None = None
    min_lr_ratio: float | None = None
    data: dict[str, Any] = field(default_factory=dict)  # data.* fields that differ (e.g. sources: long documents)
    model: dict[str, Any] = field(default_factory=dict)  # only PHASE_MODEL_FIELDS (the RoPE frequencies)


@dataclass(frozen=True)
class Phase:
    """A phase with every value resolved."""

    index: int
    name: str
    start: int  # first optimizer step (0-based count of steps done when it begins)
    end: int  # steps done when it ends
    seq_len: int
    batch_size: int
    grad_accum: int
    lr: float
    warmup_steps: int
    decay_fraction: float
    min_lr_ratio: float
    data: DataArgs
    data_seed: int
    model: ModelArgs

    @property
    def steps(self) -> int:
        return self.end - self.start


def _phase_seed(seed: int, index: int) -> int:
    """Phase 0 keeps train.seed (a run without phases is unchanged); later phases draw their own."""
    if index == 0:
        return seed
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0]) & 0x7FFFFFFF


def resolve_phases(cfg, model: ModelArgs, data: DataArgs) -> list[Phase]:
    """The run's phases, validated; ValueError names the phase and the field."""
    t, o = cfg.train, cfg.optim
    entries = list(cfg.get("phases") or [])
    if not entries:
        entries = [OmegaConf.structured(PhaseConfig(name="train"))]
    phases, start = [], 0
    for i, p in enumerate(entries):
        where = f"phases[{i}] ({p.name})"
        last = i == len(entries) - 1
        if p.steps is None and not last:
            raise ValueError(f"{where}: steps is null, but only the last phase may run until train.steps")
        steps = (t.steps - start) if p.steps is None else p.steps
        if steps < 1:
            raise ValueError(f"{where}: covers {steps} steps (it starts at step {start} and train.steps={t.steps}); "
                             "give every phase at least one step")
        end = start + steps
        if last and end != t.steps:
            raise ValueError(f"the phases cover {end} steps but train.steps={t.steps}: make them agree (or leave "
                             "the last phase's steps null)")
        unknown = sorted(set(p.model) - set(PHASE_MODEL_FIELDS))
        if unknown:
            raise ValueError(f"{where}: model.{unknown[0]} cannot change between phases (only "
                             f"{', '.join(PHASE_MODEL_FIELDS)})")
        phase_model = replace(model, **dict(p.model)).validate()
        try:
            changes = OmegaConf.to_container(p.data, throw_on_missing=True) if p.data else {}
            if "sources" in changes and "urls" not in changes:
                changes["urls"] = None  # a phase that names its sources replaces the run's urls, and
            elif "urls" in changes and "sources" not in changes:
                changes["sources"] = []  # the other way round
            phase_data = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(data), changes))
        except Exception as e:  # noqa: BLE001 - an unknown key, a wrong type, a missing value: name the phase
            raise ValueError(f"{where}: data: {e}".splitlines()[0]) from None
        phase_data.validate()
        phase = Phase(
            index=i, name=p.name, start=start, end=end,
            seq_len=p.seq_len or t.seq_len, batch_size=p.batch_size or t.batch_size,
            grad_accum=p.grad_accum or t.grad_accum, lr=o.lr if p.lr is None else p.lr,
            warmup_steps=o.warmup_steps if p.warmup_steps is None else p.warmup_steps,
            decay_fraction=o.decay_fraction if p.decay_fraction is None else p.decay_fraction,
            min_lr_ratio=o.min_lr_ratio if p.min_lr_ratio is None else p.min_lr_ratio,
            data=phase_data, data_seed=_phase_seed(t.seed, i), model=phase_model)
        for key in ("seq_len", "batch_size", "grad_accum", "lr"):
            if not getattr(phase, key) > 0:
                raise ValueError(f"{where}: {key}={getattr(phase, key)} must be positive")
        if phase.seq_len > model.max_seq_len:
            raise ValueError(f"{where}: seq_len={phase.seq_len} exceeds model.max_seq_len={model.max_seq_len}")
        phases.append(phase)
        start = end
    if len({p.name for p in phases}) != len(phases):
        raise ValueError(f"phase names must differ: {[p.name for p in phases]}")
    return phases


def phase_at(phases: list[Phase], step: int) -> Phase:
    """The phase that the optimizer step after `step` steps belongs to (the last one past the end)."""
    return next((p for p in phases if step < p.end), phases[-1])
