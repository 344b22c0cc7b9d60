"""Sharded checkpoints with torch.distributed.checkpoint (DCP), safe to load from anywhere.

`${run.dir}/checkpoints/step-XXXXXXXX/` holds model and optimizer shards (DCP: `.metadata` and
`__R_I.distcp`) plus the TrainState (train/state.py) as JSON, readable by people and tools:
`rank-XXXXX.json` (each rank's data position) and `train_state.json` (step, tokens, LR; the same
on every rank), which rank 0 writes last and which also holds the manifest: every other file's
size and checksum. docs/checkpoints.md states the guarantees and what they cost.

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
import hashlib
import importlib
import io
import json
import logging
import os
import pickle
import re
import shutil
from concurrent.futures import Future, ThreadPoolExecutor

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from omegaconf import OmegaConf
from torch.futures import Future as TorchFuture
from torch.distributed.checkpoint import CheckpointException, DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
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
TRAIN_STATE = "train_state.json"
MANIFEST = "manifest.json"  # a weights-only checkpoint's manifest; a training one's is in train_state.json
_RECORD_KEYS = ("manifest", "sequence", "checksum")  # what train_state.json holds beside the TrainState
_BLOCK = 64 * 2**20
ALGORITHM = "sha256 of the sha256 digests of the file's 64 MiB blocks"


class CheckpointError(ValueError):
    """A checkpoint that is damaged, incomplete or unsafe to load; the message names the file."""


def _damaged(file: str, why: str) -> CheckpointError:
    return CheckpointError(f"{file} {why}. The checkpoint {os.path.dirname(file)} is damaged: restore the file from "
                           "a copy, or load an earlier checkpoint (a rerun resumes from the newest one that verifies)")


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


# ---------------------------------------------------------------- durable files and checksums


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # a filesystem that cannot sync a directory syncs its entries with the files
        pass
    finally:
        os.close(fd)


def _write_json(path: str, obj: dict, indent: int | None = None) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=indent)
        f.flush()
        os.fsync(f.fileno())


def _hash_block(path: str, offset: int, length: int) -> bytes:
    h = hashlib.sha256()
    buf = memoryview(bytearray(2**20))
    with open(path, "rb", buffering=0) as f:
        f.seek(offset)
        while length > 0:
            n = f.readinto(buf[:min(length, len(buf))])
            if not n:
                break
            h.update(buf[:n])
            length -= n
    return h.digest()


def digest_files(paths: list[str]) -> dict[str, dict]:
    """{file name: {"bytes": size, "sha256": digest}}. A file's digest is the sha256 of its 64 MiB
    blocks' sha256 digests, so that one file hashes on several threads (hashlib releases the GIL)."""
    sizes = {p: os.path.getsize(p) for p in paths}
    blocks = [(p, off, min(_BLOCK, sizes[p] - off)) for p in paths for off in range(0, sizes[p] or 1, _BLOCK)]
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = min(8, cpus, len(blocks))
    if threads > 1:
        with ThreadPoolExecutor(threads) as pool:
            digests = list(pool.map(lambda b: _hash_block(*b), blocks))
    else:
        digests = [_hash_block(*b) for b in blocks]
    out: dict[str, dict] = {}
    for (p, _, _), d in zip(blocks, digests):
        out.setdefault(p, []).append(d)
    return {os.path.basename(p): {"bytes": sizes[p], "sha256": hashlib.sha256(b"".join(ds)).hexdigest()}
            for p, ds in out.items()}


def _checksum(record: dict) -> str:
    body = {k: v for k, v in record.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _write_record(path: str, record: dict) -> None:
    """train_state.json / manifest.json: JSON with a checksum of its own content."""
    _write_json(path, {**record, "checksum": _checksum(record)}, indent=1)


def _read_json(path: str) -> dict | None:
    """The JSON object in `path`; None when there is no such file; CheckpointError naming the file
    when it does not parse or (a record) does not match its own checksum."""
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read())
    except FileNotFoundError:
        return None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise _damaged(path, f"is not valid JSON ({e}): truncated or overwritten") from None
    if not isinstance(data, dict):
        raise _damaged(path, f"holds a JSON {type(data).__name__}, not an object")
    if "checksum" in data and data["checksum"] != _checksum(data):
        raise _damaged(path, "does not match its own checksum: some bytes changed after it was written")
    return data


def read_manifest(path: str) -> dict | None:
    """{file name: {"bytes", "sha256"}} of a checkpoint, from train_state.json (training checkpoints)
    or manifest.json (weights only); None for a checkpoint written before herd kept manifests."""
    for name in (TRAIN_STATE, MANIFEST):
        file = os.path.join(path, name)
        record = _read_json(file)
        if record is None:
            continue
        if "manifest" not in record:
            return None
        files = record["manifest"].get("files") if isinstance(record["manifest"], dict) else None
        if not isinstance(files, dict) or not all(
                isinstance(e, dict) and type(e.get("bytes")) is int and isinstance(e.get("sha256"), str)
                and os.path.basename(n) == n and n not in ("", ".", "..") for n, e in files.items()):
            raise _damaged(file, "holds a malformed manifest")
        return files
    return None


def _warn_unverifiable(path: str) -> None:
    log.warning(f"{path} has no manifest (written before herd kept checksums): its files are checked for "
                "size and format only, not for flipped bytes")


def _check_files(ckpt: str, names, manifest: dict | None, needed: dict[str, int], hashes: bool) -> None:
    """Raise CheckpointError for the first of `names` that is missing, has the wrong size (or, with
    no manifest, is shorter than the metadata says) or, with `hashes`, another checksum."""
    for name in sorted(names):
        file = os.path.join(ckpt, name)
        if not os.path.isfile(file):
            raise _damaged(file, "is missing")
        size = os.path.getsize(file)
        if manifest is not None:
            if name not in manifest:
                raise _damaged(file, "is not in the checkpoint's manifest")
            if size != manifest[name]["bytes"]:
                raise _damaged(file, f"is {size} bytes, but {manifest[name]['bytes']} were written: truncated "
                                     "or overwritten")
        elif size < needed.get(name, 0):
            raise _damaged(file, f"is {size} bytes, but the checkpoint's metadata needs {needed[name]}: truncated")
    if hashes and manifest is not None:
        got = digest_files([os.path.join(ckpt, n) for n in sorted(names)])
        for name in sorted(names):
            if got[name]["sha256"] != manifest[name]["sha256"]:
                raise _damaged(os.path.join(ckpt, name), "does not match its checksum: some bytes changed after "
                                                         "it was written")


# ---------------------------------------------------------------- reading without running code

_METADATA_MODULE = "torch.distributed.checkpoint.metadata"
_OLD_METADATA_MODULE = "torch.distributed._shard.sharded_tensor.metadata"  # torch <= 2.3
# Every global a DCP `.metadata` of torch 2.x holds (verified on what herd writes: 1 rank, FSDP,
# ep=2, HSDP, async saves): the metadata dataclasses, torch.Size, dtypes and layouts, the file
# reader's _StorageInfo, and the pathlib class of StorageMeta.checkpoint_id.
_METADATA_GLOBALS = {
    *((_METADATA_MODULE, n) for n in ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata",
                                      "ChunkStorageMetadata", "TensorProperties", "MetadataIndex", "StorageMeta",
                                      "_MEM_FORMAT_ENCODING")),
    (_OLD_METADATA_MODULE, "TensorProperties"), (_OLD_METADATA_MODULE, "MEM_FORMAT_ENCODING"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"), ("torch.serialization", "_get_layout"),
    *((m, n) for m in ("pathlib", "pathlib._local") for n in ("PosixPath", "PurePosixPath", "WindowsPath",
                                                              "PureWindowsPath")),
}


class _MetadataUnpickler(pickle.Unpickler):
    """Builds the classes DCP metadata holds and refuses every other global, so that unpickling a
    crafted `.metadata` cannot call os.system, open, eval or anything else."""

    def __init__(self, f, file: str):
        super().__init__(f)
        self.file = file

    def find_class(self, module: str, name: str):
        if (module, name) in _METADATA_GLOBALS:
            return getattr(importlib.import_module(module), name)
        value = getattr(torch, name, None) if module == "torch" else None
        if isinstance(value, (torch.dtype, torch.layout, torch.memory_format)):
            return value
        raise CheckpointError(f"{self.file} asks to build {module}.{name}, which DCP metadata never holds: refusing "
                              "to load it (a crafted or foreign file). Load only checkpoints herd or DCP wrote")

    def persistent_load(self, pid):
        raise CheckpointError(f"{self.file} holds a persistent reference, which DCP metadata never does: refusing "
                              "to load it")


def read_metadata(path: str, manifest: dict | None = None) -> Metadata:
    """A checkpoint's DCP metadata, checked against the manifest first and unpickled without
    running anything from the file."""
    file = os.path.join(path, ".metadata")
    if manifest is not None:
        _check_files(path, [".metadata"], manifest, {}, hashes=True)
    try:
        with open(file, "rb") as f:
            md = _MetadataUnpickler(f, file).load()
    except (CheckpointError, FileNotFoundError):
        raise
    except Exception as e:  # noqa: BLE001 - a damaged pickle fails in many ways; all mean the same
        raise _damaged(file, f"does not unpickle ({type(e).__name__}: {e})") from None
    if not (isinstance(md, Metadata) and isinstance(md.state_dict_metadata, dict)
            and isinstance(md.storage_data, dict)):
        raise _damaged(file, "is not DCP metadata")
    for info in md.storage_data.values():
        rel = getattr(info, "relative_path", None)
        # DCP opens <checkpoint>/<relative_path>: a name only, never a path out of the directory.
        if not (isinstance(info, _StorageInfo) and isinstance(rel, str) and rel not in ("", ".", "..")
                and os.path.basename(rel) == rel and "\\" not in rel and type(info.offset) is int
                and type(info.length) is int and info.offset >= 0 and info.length >= 0):
            raise _damaged(file, f"holds a malformed storage entry {info!r}")
        if manifest is not None and rel not in manifest:
            raise _damaged(file, f"refers to {rel}, which the manifest does not list")
    return md


def _bytes_needed(md: Metadata) -> dict[str, int]:
    """{file: bytes the metadata reads from it}."""
    needed: dict[str, int] = {}
    for info in md.storage_data.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    return needed


class SafeReader(FileSystemReader):
    """DCP's file reader with the checkpoint's metadata read by `read_metadata` (no code from the
    file runs) and the files checked before their first byte is used. With `hashes`, each rank
    hashes its share of the files (`_share`: a rank's own shards when the layout is the one that
    saved them) while DCP plans the load, so a mismatch on any rank fails the load on every rank
    before anything is read; then each file a rank reads must have the manifest's size (with no
    manifest: at least what the metadata reads from it). A file that fails to decode is named."""

    def __init__(self, path: str, manifest: dict | None, hashes: bool = True, rank: int = 0, world_size: int = 1):
        super().__init__(path)
        self.ckpt, self.manifest, self.hashes = str(path), manifest, hashes
        self.share_of = (rank, world_size)
        self.metadata = read_metadata(self.ckpt, manifest)

    def read_metadata(self, *args, **kwargs) -> Metadata:
        md = self.metadata
        if md.storage_meta is None:
            md.storage_meta = StorageMeta()
        md.storage_meta.load_id = self.load_id
        return md

    def prepare_local_plan(self, plan):
        if self.hashes and self.manifest is not None:
            sizes = {n: e["bytes"] for n, e in self.manifest.items()}
            _check_files(self.ckpt, _share(list(sizes), sizes, *self.share_of), self.manifest, {}, hashes=True)
        return plan

    def read_data(self, plan, planner) -> TorchFuture:
        per_file: dict[str, list] = {}
        for item in plan.items:
            per_file.setdefault(self.storage_data[item.storage_index].relative_path, []).append(item)
        _check_files(self.ckpt, per_file, self.manifest, _bytes_needed(self.metadata), hashes=False)
        for rel, items in sorted(per_file.items()):
            try:
                super().read_data(dataclasses.replace(plan, items=items), planner).wait()
            except Exception as e:  # noqa: BLE001 - name the file, whatever failed in it
                raise _damaged(os.path.join(self.ckpt, rel), f"could not be read ({type(e).__name__}: {e})") from e
        done: TorchFuture = TorchFuture()
        done.set_result(None)
        return done


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's load planner, but byte items (the optimizer's param_groups) are unpickled with
    weights_only=True: plain data and tensors, never a class the file names."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        obj = torch.load(value, weights_only=True)
        # DCP's own placement (and its weights_only=False load) now sees what we just pickled.
        clean = io.BytesIO()
        torch.save(obj, clean)
        clean.seek(0)
        super().load_bytes(read_item, clean)


def _dcp_load(sd: dict, reader: SafeReader, no_dist: bool = False) -> None:
    """dcp.load through the safe reader; a CheckpointError on any rank is raised as itself on every
    rank (DCP wraps each rank's failure in a CheckpointException)."""
    try:
        dcp.load(sd, storage_reader=reader, planner=SafeLoadPlanner(), no_dist=no_dist)
    except CheckpointException as e:
        mine = 0 if no_dist or not dist.is_initialized() else dist.get_rank()
        failures = sorted(e.failures.items(), key=lambda kv: kv[0] != mine)
        for _, (exc, _) in failures:
            if isinstance(exc, CheckpointError):
                raise CheckpointError(str(exc)) from None
        raise


# ---------------------------------------------------------------- resume: the newest that verifies


def _share(names: list[str], sizes: dict[str, int], rank: int, world_size: int) -> list[str]:
    """The files this rank checks, the same split on every rank: rank r's own shards
    (__r_*.distcp), which it reads itself when the layout is the one that saved them, then the
    rest, the largest first, each to the rank with the fewest bytes so far."""
    load = [0] * world_size
    owner = {}
    for name in names:
        m = re.match(r"__(\d+)_\d+\.distcp$", name)
        if m and int(m.group(1)) < world_size:
            owner[name] = int(m.group(1))
            load[owner[name]] += sizes.get(name, 0)
    for name in sorted((n for n in names if n not in owner), key=lambda n: (-sizes.get(n, 0), n)):
        owner[name] = min(range(world_size), key=lambda i: (load[i], i))
        load[owner[name]] += sizes.get(name, 0)
    return [n for n in names if owner[n] == rank]


def verify_checkpoint(path: str, rank: int = 0, world_size: int = 1, hashes: bool = True,
                      data_state_is_global: bool = True) -> None:
    """Raise CheckpointError (naming the file) unless `path` is a training checkpoint that loads:
    train_state.json matches its checksum, `.metadata` its checksum and the restricted unpickler,
    this rank's (and rank 0's) rank file parses, and this rank's share of all files has the size
    and, with `hashes`, the checksum the manifest says. Every file is in one rank's share, so the
    ranks together check every byte once."""
    manifest, md = _verify_common(path, rank)
    _verify_share(path, manifest, md, rank, world_size, hashes, data_state_is_global)


def _verify_common(path: str, rank: int) -> tuple[dict | None, Metadata]:
    """What every rank checks alike: train_state.json and .metadata."""
    ts = os.path.join(path, TRAIN_STATE)
    record = _read_json(ts)
    if record is None:
        raise _damaged(ts, "is missing")
    if not (type(record.get("step")) is int and type(record.get("tokens")) is int):
        raise _damaged(ts, "holds no step and token count")
    manifest = read_manifest(path)
    if manifest is None and rank == 0:
        _warn_unverifiable(path)
    md = read_metadata(path, manifest)
    if manifest is not None:
        for name, n in _bytes_needed(md).items():
            if manifest[name]["bytes"] < n:
                raise _damaged(os.path.join(path, ".metadata"), f"reads {n} bytes of {name}, which has "
                                                                 f"{manifest[name]['bytes']}")
    return manifest, md


def _verify_share(path: str, manifest: dict | None, md: Metadata, rank: int, world_size: int, hashes: bool,
                  data_state_is_global: bool) -> None:
    """What differs by rank: the rank files it reads, and its share of the files to check."""
    for r in sorted({rank, 0} if data_state_is_global else {rank}):
        _read_rank_file(path, r, manifest)
    needed = _bytes_needed(md)
    sizes = {n: e["bytes"] for n, e in manifest.items()} if manifest is not None else needed
    _check_files(path, _share(list(sizes), sizes, rank, world_size), manifest, needed, hashes)


def _resume_order(run_dir: str) -> dict[int, str]:
    """{key: checkpoint}, the key growing with the order in which the checkpoints were saved
    (train_state.json's `sequence`; 0 for checkpoints older than it, ordered by step). A
    checkpoint whose train_state.json is unreadable sorts right after the one before it in step
    order, so that a damaged newest checkpoint is tried, reported and skipped."""
    found = []
    for path in list_checkpoints(run_dir):
        try:
            record = _read_json(os.path.join(path, TRAIN_STATE))
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
            manifest, md = _verify_common(path, rank)
            everyone = False
            _verify_share(path, manifest, md, rank, world_size, hashes, data_state_is_global)
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
        _write_json(os.path.join(tmp, _rank_file(self.rank)), rank_state)
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
        mine += [_rank_file(self.rank)] + ([".metadata"] if self.rank == 0 else [])
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
            _write_record(os.path.join(tmp, TRAIN_STATE), record)
            _fsync_dir(tmp)
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
                seqs.append(int((_read_json(os.path.join(path, TRAIN_STATE)) or {}).get("sequence", 0)))
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
        _fsync_dir(os.path.dirname(final))
        if os.path.exists(old):
            shutil.rmtree(old)

    def _prune(self) -> None:
        ours = [p for p in list_checkpoints(self.run_dir)
                if _step_of(p) in self._written or (self._resumed is not None and _step_of(p) <= self._resumed)]
        for old in ours[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)


def _rank_file(rank: int) -> str:
    return f"rank-{rank:05d}.json"


# ---------------------------------------------------------------- loading


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
        _warn_unverifiable(path)
    train_state = rank_state = None
    if optimizer is not None and state is not None:  # parsed before anything is loaded into the model
        train_state = _read_json(os.path.join(path, TRAIN_STATE))
        if train_state is None:
            raise CheckpointError(f"{path} holds weights only (no {TRAIN_STATE}); load it without an optimizer, or "
                                  "with checkpoint.weights_only=true")
        rank_state = _read_rank_file(path, state.rank, manifest)
        if rank_state is None and state.data_state_is_global:
            rank_state = _read_rank_file(path, 0, manifest)
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    reader = SafeReader(path, manifest, not verified, rank, world_size)
    if optimizer is None:
        sd = {"model": get_model_state_dict(model)}
        _dcp_load(sd, reader)
        set_model_state_dict(model, sd["model"])
        return
    model_sd, optim_sd = get_state_dict(model, optimizer)
    sd = {"model": model_sd, "optim": optim_sd}
    _dcp_load(sd, reader)
    set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    if state is not None:
        kept = {k: v for k, v in train_state.items() if k not in _RECORD_KEYS}
        state.load_state_dict({**kept, "data": (rank_state or {}).get("data")})


def _read_rank_file(path: str, rank: int, manifest: dict | None) -> dict | None:
    name = _rank_file(rank)
    if manifest is not None and name in manifest:
        _check_files(path, [name], manifest, {}, hashes=True)
    return _read_json(os.path.join(path, name))


def model_args_of_checkpoint(path: str) -> ModelArgs:
    """The model config a checkpoint was written with: model_args.json beside the shards (for
    checkpoints converted from Hugging Face) or the run's config.yaml, two levels up."""
    converted = os.path.join(path, "model_args.json")
    if os.path.isfile(converted):
        return ModelArgs(**_read_json(converted))
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
        _warn_unverifiable(path)
    elif "model_args.json" in manifest:
        _check_files(path, ["model_args.json"], manifest, {}, hashes=True)
    reader = SafeReader(path, manifest)
    with torch.device("meta"):
        model = Transformer(model_args_of_checkpoint(path))
    model.to_empty(device="cpu")
    state = {"model": model.state_dict()}
    _dcp_load(state, reader, no_dist=True)
    model.load_state_dict(state["model"])
    to_hf(model, out, dtype=dtype)
    return model


def save_weights(model: Transformer, out: str) -> None:
    """A weights-only checkpoint of `model` in `out` (what `checkpoint.load=` starts from): DCP
    shards, model_args.json, and manifest.json with both's sizes and checksums. One process."""
    dcp.save({"model": model.state_dict()}, checkpoint_id=out, no_dist=True)
    _write_json(os.path.join(out, "model_args.json"), dataclasses.asdict(model.args), indent=1)
    files = sorted({".metadata", "model_args.json", *_bytes_needed(read_metadata(out))})
    _write_record(os.path.join(out, MANIFEST), {"manifest": {"algorithm": ALGORITHM, "files": digest_files(
        [os.path.join(out, f) for f in files])}})
    _fsync_dir(out)
