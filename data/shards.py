"""Shard lists, the split of shards over (rank, worker) streams, and raw tar reading.

Every stream's order is a pure function of (seed, source, epoch, stream), so a stream can be
rebuilt anywhere and resumed from a position (epoch, unit, sample) without any saved
buffers. Reading never raises for bad data: a shard that cannot be opened or that breaks off
mid-way yields one error item (a dict with "__error__") and reading moves to the next shard;
a sample that breaks a ReadLimits budget or repeats a name yields an error item in its place
and reading goes on. Members are judged by their tar header before they are read: one that
is too large or of a type nothing decodes is passed over unread (streamed past in small reads,
through a bounded decompressor for a compressed shard), so a worker never holds more of a shard
than the budgets allow.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import lzma
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator
from urllib.parse import urlparse
from urllib.request import url2pathname

import numpy as np
from webdataset.gopen import gopen
from webdataset.shardlists import expand_urls as wds_expand_urls
from webdataset.tariterators import base_plus_ext

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
SHARD_ERRORS = ("unreadable_shard", "truncated_tar")  # end the shard; other error items are one sample
URL_FORMS = "a directory of .tar shards, a brace pattern such as /data/shard-{000000..000099}.tar, or pipe:CMD"


def _local_path(url: str) -> str | None:
    """The file system path a shard url names, or None for a `pipe:` command, stdin ("-") or a
    remote url (s3://, gs://, http(s)://, ...), which are only checked when they are read.
    Mirrors webdataset's gopen: no scheme or file: is local."""
    if url == "-" or url.startswith("pipe:"):
        return None
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return url2pathname(parsed.path)
    return url if parsed.scheme == "" else None


def _shorten(urls: str | list[str], keep: int = 3) -> str:
    if isinstance(urls, str):
        return repr(urls if len(urls) <= 200 else urls[:200] + "...")
    items = list(urls)
    head = ", ".join(repr(str(u)) for u in items[:keep])
    return f"[{head}, ... ({len(items)} in all)]" if len(items) > keep else f"[{head}]"


def expand_shards(urls: str | list[str]) -> list[str]:
    """Shard urls from a directory (its tar files, sorted), a brace pattern such as
    `data/shard-{000000..000099}.tar`, a `pipe:` command (braces expand into one command per
    shard), several of these joined by `::`, or a list of any of them. A local path that does
    not exist raises FileNotFoundError here, before any reading starts."""
    pieces = [u for item in ([urls] if isinstance(urls, str) else list(urls)) for u in wds_expand_urls(str(item))]
    out: list[str] = []
    missing: list[str] = []
    for url in pieces:
        path = _local_path(url)
        if path is not None and os.path.isdir(path):
            found = sorted(str(p) for p in Path(path).iterdir() if p.name.endswith(TAR_SUFFIXES))
            if not found:
                raise ValueError(f"data: directory {url!r} holds no {'/'.join(TAR_SUFFIXES)} shards")
            out.extend(found)
        elif path is not None and not os.path.exists(path):
            missing.append(url)
        else:
            out.append(url)
    if missing:
        if len(pieces) == 1:
            raise FileNotFoundError(f"data: shard path {missing[0]!r} does not exist; give {URL_FORMS}")
        first = ", ".join(repr(u) for u in missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise FileNotFoundError(
            f"data: {len(missing)} of the {len(pieces)} shard paths from urls {_shorten(urls)} do not exist "
            f"({first}); give {URL_FORMS}"
        )
    if not out:
        raise ValueError(f"data: urls {_shorten(urls)} expand to no shards")
    return out


def seeded_rng(*keys: int) -> np.random.Generator:
    return np.random.default_rng([int(k) & 0xFFFFFFFF for k in keys])


@dataclass(frozen=True)
class ReadUnit:
    """One pass over one shard, keeping the samples whose index % stride == offset
    (stride > 1 only when there are fewer shards than streams)."""

    url: str
    stride: int = 1
    offset: int = 0


def plan_epoch(
    urls: list[str], stream: int, num_streams: int, seed: int, source: int, epoch: int, shuffle: bool
) -> list[ReadUnit]:
    """The units stream `stream` reads in `epoch`. All streams agree on one shard permutation
    (seeded without the stream), so together they read every sample exactly once."""
    order = np.arange(len(urls))
    if shuffle:
        order = seeded_rng(seed, source, epoch, 0x5EED).permutation(len(urls))
    n = len(urls)
    if n >= num_streams:
        return [ReadUnit(urls[order[i]]) for i in range(stream, n, num_streams)]
    # Fewer shards than streams: streams share a shard and split it sample by sample.
    sharers = len(range(stream % n, num_streams, n))
    return [ReadUnit(urls[order[stream % n]], stride=sharers, offset=stream // n)]


def resampled_unit(urls: list[str], stream: int, seed: int, source: int, index: int) -> ReadUnit:
    """The `index`-th shard drawn (with replacement) by a stream in resampling mode."""
    return ReadUnit(urls[int(seeded_rng(seed, source, stream, index, 0xA5).integers(len(urls)))])


@dataclass(frozen=True)
class ReadLimits:
    """What read_unit may hold in memory. A member larger than max_member_bytes, text members
    (text_exts) of one sample above max_text_bytes together, or the kept members of one sample
    above max_sample_bytes together turn the sample into an error item, decided from tar
    headers before the member is read. Members whose last extension is not in `exts` (None:
    all) are never read. `pipe:` urls are only opened with allow_pipe."""

    max_member_bytes: int = 64 << 20
    max_sample_bytes: int = 128 << 20
    max_text_bytes: int = 4 << 20
    exts: frozenset[str] | None = None
    text_exts: frozenset[str] = frozenset({"json", "txt"})
    allow_pipe: bool = False


# A pax or GNU long-name header is read whole by tarfile before any member it describes; names
# and metadata never need more than this.
MAX_HEADER_BYTES = 1 << 20
_EXTENDED = (
    tarfile.GNUTYPE_LONGNAME,
    tarfile.GNUTYPE_LONGLINK,
    tarfile.XHDTYPE,
    tarfile.XGLTYPE,
    tarfile.SOLARIS_XHDTYPE,
)
_META = re.compile(r"__[^/]*__($|/)")  # webdataset's metadata members (__key__ ...), skipped as it does


class _BoundedTarInfo(tarfile.TarInfo):
    """tarfile's header parsing, refusing the headers it would read whole into memory however
    large they claim to be: extended (pax, GNU long name) headers above MAX_HEADER_BYTES and
    sparse members, whose maps are unbounded. The error ends the shard (truncated_tar)."""

    def _proc_member(self, tf):
        if self.type in _EXTENDED and self.size > MAX_HEADER_BYTES:
            raise tarfile.HeaderError(f"extended header of {self.size} bytes > {MAX_HEADER_BYTES}")
        if self.type == tarfile.GNUTYPE_SPARSE:
            raise tarfile.HeaderError(f"{self.name!r}: sparse members are not supported")
        return super()._proc_member(tf)

    def _refuse_sparse(self, *args):
        raise tarfile.HeaderError("sparse members are not supported")

    _proc_gnusparse_00 = _proc_gnusparse_01 = _proc_gnusparse_10 = _refuse_sparse


class _Prefixed:
    """A read-only stream with bytes already read from it put back in front."""

    def __init__(self, head: bytes, stream):
        self.head, self.stream = head, stream

    def read(self, size: int = -1) -> bytes:
        if not self.head:
            return self.stream.read(size)
        if size is None or size < 0:
            out, self.head = self.head + self.stream.read(), b""
        else:
            out, self.head = self.head[:size], self.head[size:]
        return out


def _open_tar(stream) -> tarfile.TarFile:
    """A tar read as a stream, decompressed (gzip, bzip2, xz: told by their magic bytes) by
    readers that return at most what is asked for: tarfile's own decompression in stream mode
    holds a whole inflated chunk (up to ~1000x its compressed size) and re-slices it per read."""
    head = b""
    while len(head) < 6:
        more = stream.read(6 - len(head))
        if not more:
            break
        head += more
    raw = _Prefixed(head, stream)
    if head.startswith(b"\x1f\x8b"):
        raw = gzip.GzipFile(fileobj=raw, mode="rb")
    elif head.startswith(b"BZh"):
        raw = bz2.BZ2File(raw)
    elif head.startswith(b"\xfd7zXZ\x00"):
        raw = lzma.LZMAFile(raw)
    # tarfile's default 10 KiB reads: it re-slices its buffer on every read, so larger reads
    # slow down shards of small members and gain nothing when streaming past a large one
    return tarfile.open(fileobj=raw, mode="r|", tarinfo=_BoundedTarInfo)


def error_item(reason: str, url: str, detail: str = "", key: str | None = None) -> dict:
    item = {"__error__": reason, "__url__": url, "__detail__": detail[:300]}
    if key is not None:
        item["__key__"] = key
    return item


def _close_quietly(stream) -> None:
    try:
        stream.close()
    except Exception:
        pass


class _Sample:
    """The sample being assembled: its members so far, or why it is skipped."""

    def __init__(self, key: str, index: int, wanted: bool):
        self.key, self.index, self.wanted = key, index, wanted
        self.members: dict[str, bytes] = {}
        self.names: set[str] = set()
        self.nbytes = 0  # kept bytes, plus a header's worth per member (names are held too)
        self.text_bytes = 0
        self.error: tuple[str, str] | None = None

    def fail(self, reason: str, detail: str) -> None:
        self.error = (reason, f"{self.key}: {detail}")
        self.members, self.names = {}, set()

    def result(self, url: str) -> dict:
        if self.error is not None:
            return error_item(self.error[0], url, self.error[1], key=self.key)
        return {"__key__": self.key, "__url__": url, **self.members}


def _add_member(tar: tarfile.TarFile, info: tarfile.TarInfo, sample: _Sample, suffix: str, limits: ReadLimits):
    """Read one member into the sample, or decide from its header why not."""
    if suffix in sample.names:
        return sample.fail("duplicate_member", f"two members named {info.name!r}")
    sample.names.add(suffix)
    sample.nbytes += tarfile.BLOCKSIZE + len(info.name)
    if info.size > limits.max_member_bytes:
        return sample.fail("member_too_large", f"{info.name!r} has {info.size} bytes > max_member_bytes")
    ext = suffix.rsplit(".", 1)[-1]
    if limits.exts is not None and ext not in limits.exts:
        pass  # never decoded: passed over unread
    elif ext in limits.text_exts and sample.text_bytes + info.size > limits.max_text_bytes:
        return sample.fail("text_too_long", f"{sample.text_bytes + info.size} bytes of text > max_text_bytes")
    else:
        sample.nbytes += info.size
        if ext in limits.text_exts:
            sample.text_bytes += info.size
        if sample.nbytes <= limits.max_sample_bytes:
            sample.members[suffix] = tar.extractfile(info).read()
    if sample.nbytes > limits.max_sample_bytes:
        sample.fail("sample_too_large", f"members of more than max_sample_bytes={limits.max_sample_bytes}")


def read_unit(unit: ReadUnit, start: int = 0, limits: ReadLimits = ReadLimits()) -> Iterator[tuple[int, dict]]:
    """Yield (index in shard, sample) for this unit's samples with index >= start. A sample is
    webdataset's dict {"__key__", "__url__", ext: bytes} (members grouped by key as webdataset
    does), or an error item for a sample that breaks `limits` (member_too_large,
    sample_too_large, text_too_long) or repeats a member name (duplicate_member) or a key an
    earlier sample of the shard used (duplicate_key). Samples before `start` or of another
    stride are passed over unread. On failure yields (index, error item) once and stops:
    "unreadable_shard" before any sample was read, else "truncated_tar"."""
    if unit.url.strip().startswith("pipe:") and not limits.allow_pipe:
        detail = "pipe: urls run a shell command; set data.allow_pipe=true to allow them"
        yield 0, error_item("unreadable_shard", unit.url, detail)
        return
    try:
        stream = gopen(unit.url, "rb")
    except Exception as exc:
        yield 0, error_item("unreadable_shard", unit.url, repr(exc))
        return
    index, error, closed = -1, None, False  # index: the last sample completed
    try:
        tar = _open_tar(stream)
        keys: set[bytes] = set()  # digests: a key costs 8 bytes however long it is
        current: _Sample | None = None
        for info in tar:
            tar.members = []  # tarfile keeps every header it has read otherwise
            name = info.name
            if not info.isreg() or _META.match(name):
                continue
            key, suffix = base_plus_ext(name)
            if key is None:
                continue
            if current is None or key != current.key:
                if current is not None:
                    index = current.index
                    if current.wanted:
                        yield index, current.result(unit.url)
                i = index + 1
                current = _Sample(key, i, i >= start and i % unit.stride == unit.offset)
                digest = hashlib.blake2b(key.encode("utf-8", "surrogateescape"), digest_size=8).digest()
                if digest in keys:
                    current.fail(
                        "duplicate_key",
                        "the key of an earlier sample in this shard (members of a sample must be adjacent)",
                    )
                keys.add(digest)
            if current.wanted and current.error is None:
                _add_member(tar, info, current, suffix.lower(), limits)
        if current is not None:
            index = current.index
            if current.wanted:
                yield index, current.result(unit.url)
        closed = True
        stream.close()  # a `pipe:` command reports its exit status here
    except Exception as exc:
        error = exc
    finally:  # also when the reader is dropped half-way (GeneratorExit)
        if not closed:
            _close_quietly(stream)
    if error is not None:
        yield index + 1, error_item("truncated_tar" if index >= 0 else "unreadable_shard", unit.url, repr(error))
