"""Sharded checkpoints with torch.distributed.checkpoint (DCP), safe to load from anywhere.

`${run.dir}/checkpoints/step-XXXXXXXX/` holds model and optimizer shards (DCP: `.metadata` and
`__R_I.distcp`) plus the TrainState (train/state.py) as JSON, readable by people and tools:
`rank-XXXXX.json` (each rank's data position) and `train_state.json` (step, tokens, LR; the same
on every rank), which rank 0 writes last and which also holds the manifest: every other file's
size and checksum. docs/checkpoints.md states the guarantees and what they cost; the checks and
the safe reading live in train/integrity.py.

    save     every rank writes its shards and rank file into step-XXXXXXXX.tmp and hashes what it
             wrote; rank 0 gathers the digests, writes train_state.json, fsyncs, renames
    verify   sizes and checksums against the manifest, JSON that parses, and `.metadata` through an
             unpickler that builds DCP's metadata classes and nothing else (CheckpointError names
             the file)
    resume   find_resume_checkpoint: the most recently saved checkpoint that verifies, all ranks
             agreeing; the hashing is split over the ranks
    load     load_checkpoint / export_to_hf read through SafeReader and SafeLoadPlanner: no pickle
             from the checkpoint runs code, and each rank checks the files it reads before reading
"""
from __future__ import annotations

import dataclasses
import logging
import os
import re
import shutil
from concurrent.futures import Future, ThreadPoolExecutor

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from omegaconf import OmegaConf
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from model import ModelArgs, Transformer
from model.hf import to_hf

from .integrity import (
    ALGORITHM,
    MANIFEST,
    RECORD_KEYS,
    TRAIN_STATE,
    CheckpointError,
    SafeReader,
    bytes_needed,
    check_files,
    dcp_load,
    digest_files,
    fsync_dir,
    rank_file,
    read_json,
    read_manifest,
    read_metadata,
    read_rank_file,
    verify_common,
    verify_share,
    warn_unverifiable,
    write_json,
    write_record,
)
from .state import TrainState

log = logging.getLogger("herd")
_STEP_DIR = re.compile(r"step-(\d{8})$")


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def checkpoint_dir(run_dir: str, step: int) -> str:
    return os.path.join(run_dir, "checkpoints", f"step-{step:08d}")


def list_checkpoints(run_dir: str) -> list[str]:
    """Complete checkpoints in run_dir, by step."""
    root = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    found = [(int(m.group(1)), os.path.join(root, d)) for d in os.listdir(root) if (m := _STEP_DIR.match(d))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str) -> str | None:
    """The complete checkpoint with the highest step (unverified; to resume, find_resume_checkpoint)."""
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def _step_of(path: str) -> int:
    return int(_STEP_DIR.search(path).group(1))


# ---------------------------------------------------------------- resume: the newest that verifies

def _resume_order(run_dir: str) -> dict[int, str]:
    """{key: checkpoint}, the key growing with the order in which the checkpoints were saved
    (train_state.json's `sequence`; 0 for checkpoints older than it, ordered by step). A
    checkpoint whose train_state.json is unreadable sorts right after the one before it in step
    order, so that a damaged newest checkpoint is tried, reported and skipped."""
    found = []
    for path in list_checkpoints(run_dir):
        try:
            record = read_json(os.path.join(path, TRAIN_STATE))
            seq = max(0, int(record.get("sequence", 0))) if record is not None else None
        except (CheckpointError, TypeError, ValueError):
            seq = None
        found.append((_step_of(path), seq, path))
    keys, last_seq = {}, 0
    for step, seq, path in found:
        last_seq = seq if seq is not None else last_seq
        keys[(last_seq << 32) | step] = path
    return keys


def find_resume_checkpoint(run_dir: str, rank: int = 0, world_size: int = 1, all_reduce=None,
                           hashes: bool = True, data_state_is_global: bool = True) -> str | None:
    """The most recently saved checkpoint in run_dir that verifies (verify_checkpoint), or None;
    a warning for each newer one skipped, saying why. Call it on every rank with `all_reduce(t,
    "max")` reducing a CPU int64 tensor over all ranks (the Trainer's env.all_reduce): the ranks
    agree on each candidate and on its verdict, so all resume from the same checkpoint."""
    def agree(x: int) -> int:
        return x if all_reduce is None else int(all_reduce(torch.tensor([x], dtype=torch.int64), "max")[0])

    keys, tried = _resume_order(run_dir), set()
    while True:
        key = agree(max((k for k in keys if k not in tried), default=-1))
        if key < 0:
            return None
        path = keys.get(key)
        where = path or f"step-{key & 0xFFFFFFFF:08d}"
        problem, everyone = None, True  # a problem every rank finds alike is reported by rank 0 only
        try:
            if path is None:
                everyone = False
                raise CheckpointError(f"rank {rank} does not see {where}, which another rank sees")
            manifest, md = verify_common(path, rank)
            everyone = False
            verify_share(path, manifest, md, rank, world_size, hashes, data_state_is_global)
        except Exception as e:  # noqa: BLE001 - whatever fails, the ranks must still agree
            problem = str(e) if isinstance(e, (CheckpointError, OSError)) else f"{type(e).__name__}: {e}"
        if not agree(int(problem is not None)):
            return path
        if problem and (rank == 0 or not everyone):
            log.warning(f"rank {rank}: not resuming from {where}: {problem}")
        elif not problem and rank == 0:
            log.warning(f"not resuming from {where}: another rank found it damaged (its warning says why)")
        tried.add(key)


# ---------------------------------------------------------------- saving


class Checkpointer:
    """Writes checkpoints atomically: every rank writes its shards into step-XXXXXXXX.tmp and hashes
    them, and only when all have finished does rank 0 add train_state.json (with the manifest) and
    rename the directory. With `async_save`, the shards are written and hashed in the background
    and the rename happens when the next checkpoint starts or at `wait()`.

    Pruning keeps the newest `keep` of this run's trajectory: the checkpoints this Checkpointer
    wrote and, after `resumed_from(step)`, those up to that step. A checkpoint of another
    trajectory in the same run.dir (a `checkpoint.resume=false` run's predecessor) at a higher
    step is never removed, unless a save of the same step replaces it."""

    def __init__(self, run_dir: str, keep: int, rank: int, async_save: bool = False, before_rename=None):
        self.run_dir, self.keep, self.rank, self.async_save = run_dir, keep, rank, async_save
        self.before_rename = before_rename  # fault injection: called with the step before the rename
        self._pending = None  # (digests or their future, tmp, final, step, train_state)
        self._written: set[int] = set()
        self._resumed: int | None = None
        self.last_saved: str | None = None  # the newest checkpoint this Checkpointer completed
        # Digests are gathered, and background writes coordinate, on a gloo group of their own.
        self._group = dist.new_group(backend="gloo") if dist.is_initialized() else None
        self._hasher = ThreadPoolExecutor(1, thread_name_prefix="checkpoint-hash") if async_save else None
        if rank == 0:  # a .tmp directory is a checkpoint some crash interrupted: never complete
            root = os.path.join(run_dir, "checkpoints")
            for d in os.listdir(root) if os.path.isdir(root) else []:
                if d.endswith(".tmp"):
                    shutil.rmtree(os.path.join(root, d), ignore_errors=True)

    def resumed_from(self, step: int) -> None:
        """This run continues the run.dir's checkpoint `step`: checkpoints up to it are this run's
        history, which pruning may remove; higher ones it did not write are left alone."""
        self._resumed = step

    def save(self, step: int, model, optimizer, state: TrainState) -> str:
        """Write model, optimizer and `state` as checkpoint `step` (in the background with
        async_save; `wait()` finishes it). Returns the checkpoint's final path."""
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
        write_json(os.path.join(tmp, rank_file(self.rank)), rank_state)
        if self.async_save:
            digests = self._hasher.submit(self._digest_own, tmp, future)
        else:
            digests = self._digest_own(tmp)
        self._pending = (digests, tmp, final, step, train_state)
        if not self.async_save:
            self.wait()
        return final

    def _digest_own(self, tmp: str, future=None) -> dict:
        """Digests of the files this rank wrote (DCP names a rank's shards __<rank>_<i>.distcp;
        rank 0 also wrote .metadata), read back while they are still in the page cache."""
        if future is not None:
            future.result()
        mine = [f for f in os.listdir(tmp) if f.startswith(f"__{self.rank}_") and f.endswith(".distcp")]
        mine += [rank_file(self.rank)] + ([".metadata"] if self.rank == 0 else [])
        return digest_files([os.path.join(tmp, f) for f in mine])

    def wait(self) -> str | None:
        """Finish the pending checkpoint: all ranks done writing, the manifest, the atomic rename.
        Returns the checkpoint it completed (None when none was pending)."""
        if self._pending is None:
            return None
        digests, tmp, final, step, train_state = self._pending
        self._pending = None
        if isinstance(digests, Future):
            digests = digests.result()
        barrier()
        if self.before_rename is not None:
            self.before_rename(step)
        if self._group is not None:
            gathered = [None] * dist.get_world_size() if self.rank == 0 else None
            dist.gather_object(digests, gathered, dst=0, group=self._group)
        else:
            gathered = [digests]
        if self.rank == 0:
            manifest = {k: v for d in gathered for k, v in d.items()}
            unclaimed = set(os.listdir(tmp)) - set(manifest) - {TRAIN_STATE}  # should DCP name files otherwise
            manifest.update(digest_files([os.path.join(tmp, f) for f in sorted(unclaimed)]) if unclaimed else {})
            record = {**train_state, "sequence": self._next_sequence(),
                      "manifest": {"algorithm": ALGORITHM, "files": dict(sorted(manifest.items()))}}
            write_record(os.path.join(tmp, TRAIN_STATE), record)
            fsync_dir(tmp)
            self._replace(tmp, final)
            self._written.add(step)
            self._prune()
            log.info(f"saved checkpoint {final}")
        barrier()
        self.last_saved = final
        return final

    def _next_sequence(self) -> int:
        """1 + the highest `sequence` in run.dir: the order of saves, whatever their steps."""
        seqs = [0]
        for path in list_checkpoints(self.run_dir):
            try:
                seqs.append(int((read_json(os.path.join(path, TRAIN_STATE)) or {}).get("sequence", 0)))
            except (CheckpointError, TypeError, ValueError):
                pass
        return max(seqs) + 1

    @staticmethod
    def _replace(tmp: str, final: str) -> None:
        """Rename tmp to final, durably. A checkpoint already at final (another trajectory's) moves
        to a .tmp name first, which a crash leaves for the next start to remove."""
        old = final + ".replaced.tmp"
        if os.path.exists(final):
            os.replace(final, old)
        os.replace(tmp, final)
        fsync_dir(os.path.dirname(final))
        if os.path.exists(old):
            shutil.rmtree(old)

    def _prune(self) -> None:
        ours = [p for p in list_checkpoints(self.run_dir)
                if _step_of(p) in self._written or (self._resumed is not None and _step_of(p) <= self._resumed)]
        for old in ours[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------- loading


def checkpoint_step(path: str) -> int:
    """The step a training checkpoint was saved at (train_state.json; 0 for weights only)."""
    record = read_json(os.path.join(path, TRAIN_STATE))
    if record is None:
        return 0
    if type(record.get("step")) is not int:
        raise CheckpointError(f"{os.path.join(path, TRAIN_STATE)} holds no step")
    return record["step"]


def has_train_state(path: str) -> bool:
    """Whether `path` is a full training checkpoint (as opposed to weights only, e.g. converted
    from Hugging Face)."""
    return os.path.isfile(os.path.join(path, TRAIN_STATE))


def _require_checkpoint(path: str) -> None:
    if not os.path.isfile(os.path.join(path, ".metadata")):
        raise FileNotFoundError(f"{path} is not a complete herd checkpoint (no .metadata); "
                                "checkpoints live in <run.dir>/checkpoints/step-XXXXXXXX")


def _is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def load_checkpoint(path: str, model, optimizer=None, state: TrainState | None = None, verified: bool = False) -> None:
    """Load weights from a DCP checkpoint saved with any layout; with an optimizer and a
    TrainState, the full training state too. This rank's data position comes from its own
    rank file; a data source whose position is the same on every rank (the text source)
    resumes from rank 0's in any layout.

    Nothing from the checkpoint runs as code, and the files are checked against the manifest
    before they are used: sizes always, checksums (each rank hashing its share) unless `verified`,
    for a checkpoint find_resume_checkpoint has just verified. A damaged file raises
    CheckpointError naming it, on every rank."""
    _require_checkpoint(path)
    manifest = read_manifest(path)
    if manifest is None and not verified and _is_main():
        warn_unverifiable(path)
    train_state = rank_state = None
    if optimizer is not None and state is not None:  # parsed before anything is loaded into the model
        train_state = read_json(os.path.join(path, TRAIN_STATE))
        if train_state is None:
            raise CheckpointError(f"{path} holds weights only (no {TRAIN_STATE}); load it without an optimizer, or "
                                  "with checkpoint.weights_only=true")
        rank_state = read_rank_file(path, state.rank, manifest)
        if rank_state is None and state.data_state_is_global:
            rank_state = read_rank_file(path, 0, manifest)
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    reader = SafeReader(path, manifest, not verified, rank, world_size)
    if optimizer is None:
        sd = {"model": get_model_state_dict(model)}
        dcp_load(sd, reader)
        set_model_state_dict(model, sd["model"])
        return
    model_sd, optim_sd = get_state_dict(model, optimizer)
    sd = {"model": model_sd, "optim": optim_sd}
    dcp_load(sd, reader)
    set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    if state is not None:
        kept = {k: v for k, v in train_state.items() if k not in RECORD_KEYS}
        state.load_state_dict({**kept, "data": (rank_state or {}).get("data")})


def model_args_of_checkpoint(path: str) -> ModelArgs:
    """The model config a checkpoint was written with: model_args.json beside the shards (for
    checkpoints converted from Hugging Face) or the run's config.yaml, two levels up."""
    converted = os.path.join(path, "model_args.json")
    if os.path.isfile(converted):
        return ModelArgs(**read_json(converted))
    run_config = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(path))), "config.yaml")
    if not os.path.isfile(run_config):
        raise FileNotFoundError(f"no config.yaml for {path}: expected {run_config} (the run directory's config)")
    return ModelArgs(**OmegaConf.to_container(OmegaConf.load(run_config).model, resolve=True))


def export_to_hf(path: str, out: str, dtype: torch.dtype | None = None) -> Transformer:
    """Write a checkpoint's weights as a Hugging Face folder, in one process (any layout). Every
    file read is verified first (checksums included)."""
    if not os.path.isfile(os.path.join(path, ".metadata")):
        raise FileNotFoundError(f"{path} is not a herd checkpoint directory (no .metadata)")
    manifest = read_manifest(path)
    if manifest is None:
        warn_unverifiable(path)
    elif "model_args.json" in manifest:
        check_files(path, ["model_args.json"], manifest, {}, hashes=True)
    reader = SafeReader(path, manifest)
    with torch.device("meta"):
        model = Transformer(model_args_of_checkpoint(path))
    model.to_empty(device="cpu")
    state = {"model": model.state_dict()}
    dcp_load(state, reader, no_dist=True)
    model.load_state_dict(state["model"])
    to_hf(model, out, dtype=dtype)
    return model


def save_weights(model: Transformer, out: str) -> None:
    """A weights-only checkpoint of `model` in `out` (what `checkpoint.load=` starts from): DCP
    shards, model_args.json, and manifest.json with both's sizes and checksums. One process."""
    dcp.save({"model": model.state_dict()}, checkpoint_id=out, no_dist=True)
    write_json(os.path.join(out, "model_args.json"), dataclasses.asdict(model.args), indent=1)
    files = sorted({".metadata", "model_args.json", *bytes_needed(read_metadata(out))})
    write_record(os.path.join(out, MANIFEST), {"manifest": {"algorithm": ALGORITHM, "files": digest_files(
        [os.path.join(out, f) for f in files])}})
    fsync_dir(out)
