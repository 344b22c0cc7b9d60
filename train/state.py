"""TrainState: where a run is, as one Stateful object the Checkpointer saves and restores whole.

    step       optimizer steps taken (skipped non-finite steps do not count)
    tokens     target tokens trained on, over all ranks
    scheduler  the learning-rate schedule, positioned at `step` on load (train/optim.py)
    data       this rank's data-loader position (the next batch it hands out)

Everything but `data` is the same on every rank and goes to train_state.json; `data` is per rank
and goes to rank-XXXXX.json (train/checkpoint.py). Both are JSON, readable by people and tools.
"""
from __future__ import annotations

import logging

from torch.distributed.checkpoint.stateful import Stateful

from .optim import schedule_at

log = logging.getLogger("herd")


class TrainState(Stateful):
    def __init__(self, scheduler, data, rank: int = 0):
        self.scheduler, self.data, self.rank = scheduler, data, rank
        self.step = 0
        self.tokens = 0
        self.phase = 0  # the training phase `data` belongs to (train/phases.py)

    @property
    def data_state_is_global(self) -> bool:
        """True when every rank's data position is the same (the text source), so a checkpoint
        saved by any number of ranks resumes the data exactly in any layout."""
        return bool(getattr(self.data, "state_is_global", False))

    def state_dict(self) -> dict:
        return {"step": self.step, "tokens": self.tokens, "lr": self.scheduler.get_last_lr(), "phase": self.phase,
                "data": self.data.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.tokens = int(state["step"]), int(state["tokens"])
        schedule_at(self.scheduler, self.step)  # `lr` is for people: the config decides the rate
        data = state.get("data")
        if int(state.get("phase", 0)) != self.phase:  # saved at the end of the phase before this one
            log.info(f"rank {self.rank}: a new training phase begins: its data stream starts from its own seed")
            return
        if data is None:
            log.warning(f"rank {self.rank}: the checkpoint holds no data-loader state for this rank (saved with "
                        "another world size); the data stream restarts from its seed")
            return
        try:
            self.data.load_state_dict(data)
        except ValueError as e:
            log.warning(f"rank {self.rank}: data-loader state does not fit this run ({e}); the data stream "
                        "restarts from its seed")
