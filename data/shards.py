"""Shard lists, the split of shards over (rank, worker) streams, and raw tar reading.

Every stream's order is a pure function of (seed, source, epoch, stream), so a stream can be
rebuilt anywhere and resumed from a position (epoch, unit, sample) without any saved
buffers. Reading never raises for bad data: a shard that cannot be opened or that breaks off
mid-way yields one error item (a dict with "__error__") and reading moves to the next shard.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator
from urllib.parse import urlparse
from urllib.request import url2pathname

import numpy as np
from webdataset.gopen import gopen
from webdataset.shardlists import expand_urls as wds_expand_urls
from webdataset.tariterators import group_by_keys, tar_file_iterator

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
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


def error_item(reason: str, url: str, detail: str = "") -> dict:
    return {"__error__": reason, "__url__": url, "__detail__": detail[:300]}


def _close_quietly(stream) -> None:
    try:
        stream.close()
    except Exception:
        pass


def read_unit(unit: ReadUnit, start: int = 0) -> Iterator[tuple[int, dict]]:
    """Yield (index in shard, sample) for this unit's samples with index >= start. A sample is
    webdataset's dict {"__key__", "__url__", ext: bytes}. On failure yields (index, error item)
    once and stops: "unreadable_shard" before any sample was read, else "truncated_tar"."""
    try:
        stream = gopen(unit.url, "rb")
    except Exception as exc:
        yield 0, error_item("unreadable_shard", unit.url, repr(exc))
        return
    index, error, closed = -1, None, False
    try:
        files = ({**f, "__url__": unit.url} for f in tar_file_iterator(stream))
        for sample in group_by_keys(files):
            index += 1
            if index >= start and index % unit.stride == unit.offset:
                yield index, sample
        closed = True
        stream.close()  # a `pipe:` command reports its exit status here
    except Exception as exc:
        error = exc
    finally:  # also when the reader is dropped half-way (GeneratorExit)
        if not closed:
            _close_quietly(stream)
    if error is not None:
        yield index + 1, error_item("truncated_tar" if index >= 0 else "unreadable_shard", unit.url, repr(error))
