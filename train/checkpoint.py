"""Sharded checkpoints with torch.distributed.checkpoint (DCP).

`${run.dir}/checkpoints/step-XXXXXXXX/` holds model and optimizer shards (DCP) plus the
TrainState (train/state.py) as JSON, readable by people and tools: `train_state.json` (step,
tokens, LR schedule; the same on every rank) and `rank-XXXXX.json` (each rank's data position).
A checkpoint is written under a temporary name and renamed only once every rank has finished,
so a crash mid-write never damages the last good one.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil

import torch
import torch.distributed as dist
from omegaconf import OmegaConf
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from model import ModelArgs, Transformer
from model.hf import to_hf

from .state import TrainState

log = logging.getLogger("herd")
_STEP_DIR = re.compile(r"step-(\d{8})$")


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def checkpoint_dir(run_dir: str, step: int) -> str:
    return os.path.join(run_dir, "checkpoints", f"step-{step:08d}")


def list_checkpoints(run_dir: str) -> list[str]:
    root = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    found = [(int(m.group(1)), os.path.join(root, d)) for d in os.listdir(root) if (m := _STEP_DIR.match(d))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str) -> str | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


class Checkpointer:
    """Writes checkpoints atomically: every rank writes its shards into step-XXXXXXXX.tmp, and
    only when all have finished does rank 0 add train_state.json and rename the directory. With
    `async_save`, the shards are written in the background and the rename happens when the
    next checkpoint starts or at `wait()`."""

    def __init__(self, run_dir: str, keep: int, rank: int, async_save: bool = False, before_rename=None):
        self.run_dir, self.keep, self.rank, self.async_save = run_dir, keep, rank, async_save
        self.before_rename = before_rename  # fault injection: called with the step before the rename
        self._pending = None  # (future, tmp, final, step, train_state)
        # Background writes coordinate on their own gloo group, never on the group training uses.
        self._group = dist.new_group(backend="gloo") if async_save and dist.is_initialized() else None
        if rank == 0:  # a .tmp directory is a checkpoint some crash interrupted: never complete
            root = os.path.join(run_dir, "checkpoints")
            for d in os.listdir(root) if os.path.isdir(root) else []:
                if d.endswith(".tmp"):
                    shutil.rmtree(os.path.join(root, d), ignore_errors=True)

    def save(self, step: int, model, optimizer, state: TrainState) -> str:
        """Write model, optimizer and `state` as checkpoint `step` (in the background with
        async_save; `wait()` finishes it)."""
        self.wait()
        train_state = state.state_dict()
        rank_state = {"data": train_state.pop("data")}
        final = checkpoint_dir(self.run_dir, step)
        tmp = final + ".tmp"
        if self.rank == 0 and os.path.exists(tmp):
            shutil.rmtree(tmp)
        barrier()
        model_sd, optim_sd = get_state_dict(model, optimizer)
        sd = {"model": model_sd, "optim": optim_sd}
        if self.async_save:
            future = dcp.async_save(sd, checkpoint_id=tmp, process_group=self._group)
        else:
            dcp.save(sd, checkpoint_id=tmp)
            future = None
        os.makedirs(tmp, exist_ok=True)
        with open(os.path.join(tmp, _rank_file(self.rank)), "w") as f:
            json.dump(rank_state, f)
        self._pending = (future, tmp, final, step, train_state)
        if not self.async_save:
            self.wait()
        return final

    def wait(self) -> None:
        """Finish the pending checkpoint: all ranks done writing, then the atomic rename."""
        if self._pending is None:
            return
        future, tmp, final, step, train_state = self._pending
        self._pending = None
        if future is not None:
            future.result()
        barrier()
        if self.before_rename is not None:
            self.before_rename(step)
        if self.rank == 0:
            with open(os.path.join(tmp, "train_state.json"), "w") as f:
                json.dump(train_state, f, indent=1)
            if os.path.exists(final):
                shutil.rmtree(final)
            os.replace(tmp, final)
            for old in list_checkpoints(self.run_dir)[:-self.keep]:
                shutil.rmtree(old, ignore_errors=True)
            log.info(f"saved checkpoint {final}")
        barrier()


def _rank_file(rank: int) -> str:
    return f"rank-{rank:05d}.json"


def _read_json(path: str) -> dict | None:
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def has_train_state(path: str) -> bool:
    """Whether `path` is a full training checkpoint (as opposed to weights only, e.g. converted
    from Hugging Face)."""
    return os.path.isfile(os.path.join(path, "train_state.json"))


def load_checkpoint(path: str, model, optimizer=None, state: TrainState | None = None) -> None:
    """Load weights from a DCP checkpoint saved with any layout; with an optimizer and a
    TrainState, the full training state too. This rank's data position comes from its own
    rank file; a data source whose position is the same on every rank (the text source)
    resumes from rank 0's in any layout."""
    if not os.path.isfile(os.path.join(path, ".metadata")):
        raise FileNotFoundError(f"{path} is not a complete herd checkpoint (no .metadata); "
                                "checkpoints live in <run.dir>/checkpoints/step-XXXXXXXX")
    if optimizer is None:
        sd = {"model": get_model_state_dict(model)}
        dcp.load(sd, checkpoint_id=path)
        set_model_state_dict(model, sd["model"])
        return
    model_sd, optim_sd = get_state_dict(model, optimizer)
    sd = {"model": model_sd, "optim": optim_sd}
    dcp.load(sd, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    if state is not None:
        train_state = _read_json(os.path.join(path, "train_state.json"))
        rank_state = _read_json(os.path.join(path, _rank_file(state.rank)))
        if rank_state is None and state.data_state_is_global:
            rank_state = _read_json(os.path.join(path, _rank_file(0)))
        state.load_state_dict({**train_state, "data": (rank_state or {}).get("data")})


def model_args_of_checkpoint(path: str) -> ModelArgs:
    """The model config a checkpoint was written with: model_args.json beside the shards (for
    checkpoints converted from Hugging Face) or the run's config.yaml, two levels up."""
    converted = os.path.join(path, "model_args.json")
    if os.path.isfile(converted):
        with open(converted) as f:
            return ModelArgs(**json.load(f))
    run_config = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(path))), "config.yaml")
    if not os.path.isfile(run_config):
        raise FileNotFoundError(f"no config.yaml for {path}: expected {run_config} (the run directory's config)")
    return ModelArgs(**OmegaConf.to_container(OmegaConf.load(run_config).model, resolve=True))


def export_to_hf(path: str, out: str, dtype: torch.dtype | None = None) -> Transformer:
    """Write a checkpoint's weights as a Hugging Face folder, in one process (any layout)."""
    if not os.path.isfile(os.path.join(path, ".metadata")):
        raise FileNotFoundError(f"{path} is not a herd checkpoint directory (no .metadata)")
    with torch.device("meta"):
        model = Transformer(model_args_of_checkpoint(path))
    model.to_empty(device="cpu")
    state = {"model": model.state_dict()}
    dcp.load(state, checkpoint_id=path, no_dist=True)
    model.load_state_dict(state["model"])
    to_hf(model, out, dtype=dtype)
    return model
