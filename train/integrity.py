"""Checkpoint integrity: durable writes, manifests of checksums, and reading a checkpoint without
running anything from it (train/checkpoint.py uses these to save, verify, resume and load).

    manifest  every file's size and sha256, kept in train_state.json (manifest.json for weights
              only) with a checksum of the record itself
    metadata  DCP's `.metadata` pickle read by an unpickler that builds DCP's metadata classes and
              refuses every other global; byte items load with weights_only=True
    verify    sizes, checksums (each rank hashing its share of the files), JSON that parses
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
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import CheckpointException, DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.futures import Future as TorchFuture

log = logging.getLogger("herd")
TRAIN_STATE = "train_state.json"
MANIFEST = "manifest.json"  # a weights-only checkpoint's manifest; a training one's is in train_state.json
RECORD_KEYS = ("manifest", "sequence", "checksum")  # what train_state.json holds beside the TrainState
_BLOCK = 64 * 2**20
ALGORITHM = "sha256 of the sha256 digests of the file's 64 MiB blocks"


class CheckpointError(ValueError):
    """A checkpoint that is damaged, incomplete or unsafe to load; the message names the file."""


def _damaged(file: str, why: str) -> CheckpointError:
    return CheckpointError(f"{file} {why}. The checkpoint {os.path.dirname(file)} is damaged: restore the file from "
                           "a copy, or load an earlier checkpoint (a rerun resumes from the newest one that verifies)")


# ---------------------------------------------------------------- durable files and checksums


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # a filesystem that cannot sync a directory syncs its entries with the files
        pass
    finally:
        os.close(fd)


def write_json(path: str, obj: dict, indent: int | None = None) -> None:
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


def write_record(path: str, record: dict) -> None:
    """train_state.json / manifest.json: JSON with a checksum of its own content."""
    write_json(path, {**record, "checksum": _checksum(record)}, indent=1)


def read_json(path: str) -> dict | None:
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
        record = read_json(file)
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


def warn_unverifiable(path: str) -> None:
    log.warning(f"{path} has no manifest (written before herd kept checksums): its files are checked for "
                "size and format only, not for flipped bytes")


def check_files(ckpt: str, names, manifest: dict | None, needed: dict[str, int], hashes: bool) -> None:
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
        check_files(path, [".metadata"], manifest, {}, hashes=True)
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


def bytes_needed(md: Metadata) -> dict[str, int]:
    """{file: bytes the metadata reads from it}."""
    needed: dict[str, int] = {}
    for info in md.storage_data.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    return needed


class SafeReader(FileSystemReader):
    """DCP's file reader with the checkpoint's metadata read by `read_metadata` (no code from the
    file runs) and the files checked before their first byte is used. With `hashes`, each rank
    hashes its share of the files (`share_of_files`: a rank's own shards when the layout is the one that
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
            check_files(self.ckpt, share_of_files(list(sizes), sizes, *self.share_of), self.manifest, {}, hashes=True)
        return plan

    def read_data(self, plan, planner) -> TorchFuture:
        per_file: dict[str, list] = {}
        for item in plan.items:
            per_file.setdefault(self.storage_data[item.storage_index].relative_path, []).append(item)
        check_files(self.ckpt, per_file, self.manifest, bytes_needed(self.metadata), hashes=False)
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


def dcp_load(sd: dict, reader: SafeReader, no_dist: bool = False) -> None:
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




def share_of_files(names: list[str], sizes: dict[str, int], rank: int, world_size: int) -> list[str]:
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
    manifest, md = verify_common(path, rank)
    verify_share(path, manifest, md, rank, world_size, hashes, data_state_is_global)


def verify_common(path: str, rank: int) -> tuple[dict | None, Metadata]:
    """What every rank checks alike: train_state.json and .metadata."""
    ts = os.path.join(path, TRAIN_STATE)
    record = read_json(ts)
    if record is None:
        raise _damaged(ts, "is missing")
    if not (type(record.get("step")) is int and type(record.get("tokens")) is int):
        raise _damaged(ts, "holds no step and token count")
    manifest = read_manifest(path)
    if manifest is None and rank == 0:
        warn_unverifiable(path)
    md = read_metadata(path, manifest)
    if manifest is not None:
        for name, n in bytes_needed(md).items():
            if manifest[name]["bytes"] < n:
                raise _damaged(os.path.join(path, ".metadata"), f"reads {n} bytes of {name}, which has "
                                                                 f"{manifest[name]['bytes']}")
    return manifest, md


def verify_share(path: str, manifest: dict | None, md: Metadata, rank: int, world_size: int, hashes: bool,
                  data_state_is_global: bool) -> None:
    """What differs by rank: the rank files it reads, and its share of the files to check."""
    for r in sorted({rank, 0} if data_state_is_global else {rank}):
        read_rank_file(path, r, manifest)
    needed = bytes_needed(md)
    sizes = {n: e["bytes"] for n, e in manifest.items()} if manifest is not None else needed
    check_files(path, share_of_files(list(sizes), sizes, rank, world_size), manifest, needed, hashes)


def rank_file(rank: int) -> str:
    return f"rank-{rank:05d}.json"


def read_rank_file(path: str, rank: int, manifest: dict | None) -> dict | None:
    name = rank_file(rank)
    if manifest is not None and name in manifest:
        check_files(path, [name], manifest, {}, hashes=True)
    return read_json(os.path.join(path, name))
