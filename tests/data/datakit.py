"""Builders of tiny shards for the data tests (made in tmp_path, never shipped)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from data.tokenizer import Tokenizer


def png_bytes(w: int = 40, h: int = 30, seed: int = 0) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def mp4_bytes(frames: int = 4, fps: int = 4, seed: int = 0, size: tuple[int, int] = (64, 48)) -> bytes:
    from data.sample import pan_video

    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0] * 2, 3), dtype=np.uint8)
    return pan_video(Image.fromarray(arr), "mp4", frames=frames, fps=fps, size=size)


def key_strings(tok: Tokenizer, n: int) -> list[str]:
    """n distinct words that each encode to exactly one token and never occur in filler text."""
    out = []
    for i in range(600, tok.base_vocab):
        s = tok.decode([i])
        if s.startswith(" ") and s[1:].isalpha() and s[1:].islower() and tok.encode(s) == [i]:
            out.append(s)
            if len(out) == n:
                return out
    raise AssertionError("not enough single-token words")


def filler(n: int, seed: int) -> str:
    """Digits only: cannot merge into the alphabetic key tokens."""
    rng = np.random.default_rng(seed)
    return "".join(f" {int(x)}" for x in rng.integers(0, 1000, n))


def write_tar(path: Path, samples: list[dict]) -> Path:
    """samples: {"__key__": k, ext: bytes | str}. Plain tarfile, members in key order."""
    with tarfile.open(path, "w") as tar:
        for s in samples:
            for ext in sorted(k for k in s if k != "__key__"):
                data = s[ext].encode("utf-8") if isinstance(s[ext], str) else s[ext]
                info = tarfile.TarInfo(f"{s['__key__']}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


class _Zeros(io.RawIOBase):
    """n zero bytes, produced as they are read."""

    def __init__(self, n: int):
        self.left = n

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        k = min(len(buf), self.left)
        buf[:k] = bytes(k)
        self.left -= k
        return k


def write_members(path: Path, members: list[tuple[str, bytes | str | int]], compress: str = "") -> Path:
    """A tar of exactly these (name, data) members, in this order (duplicates included). An int
    is a member of that many zero bytes, streamed into the tar, never built in memory.
    compress: "" or "gz" (level 1: these tests build large members)."""
    kwargs = {"compresslevel": 1} if compress == "gz" else {}
    with tarfile.open(path, f"w:{compress}", **kwargs) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if isinstance(data, int):
                info.size = data
                tar.addfile(info, io.BufferedReader(_Zeros(data), 1 << 20))
            else:
                data = data.encode("utf-8") if isinstance(data, str) else data
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def doc_json(*segments: dict) -> str:
    return json.dumps({"segments": list(segments)})


def key_dataset(
    tmp: Path, tok: Tokenizer, shards: int, per_shard: int, image_every: int = 0, seed: int = 0, first_key: int = 0
):
    """Shards of documents that each hold one unique key token (plus digit filler, and an image
    every `image_every` documents); keys start at the first_key-th key word, so two datasets can
    have disjoint keys. Returns (directory, {key token id: sample key})."""
    keys = key_strings(tok, first_key + shards * per_shard)[first_key:]
    rng = np.random.default_rng(seed)
    ids = {}
    tmp.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        samples = []
        for j in range(per_shard):
            n = s * per_shard + j
            key = f"s{s:02d}-{j:03d}"
            text = keys[n] + filler(int(rng.integers(2, 120)), n)
            if image_every and n % image_every == 0:
                samples.append(
                    {"__key__": key, "json": doc_json({"text": text}, {"image": "png"}), "png": png_bytes(seed=n)}
                )
            else:
                samples.append({"__key__": key, "txt": text})
            ids[tok.encode(keys[n])[0]] = key
        write_tar(tmp / f"part-{s:04d}.tar", samples)
    return tmp, ids


def same_batch(a: dict, b: dict) -> None:
    """Two batches are identical: the same keys, tensors bitwise equal, the rest equal."""
    assert a.keys() == b.keys()
    for k in a:
        if torch.is_tensor(a[k]):
            assert torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


def check_batch(batch: dict, tok: Tokenizer) -> None:
    """Invariants every batch must satisfy."""
    tokens, labels, pos, docs = batch["tokens"], batch["labels"], batch["positions"], batch["doc_ids"]
    assert tokens.dtype == labels.dtype == pos.dtype == docs.dtype
    assert int((tokens == tok.ids.patch).sum()) == 144 * batch["images"].shape[0]
    pad = docs < 0
    assert bool((labels[pad] == -100).all()) and bool((tokens[pad] == tok.ids.pad).all())
    same = (docs[:, 1:] == docs[:, :-1]) & (docs[:, 1:] >= 0)
    lab = labels[:, :-1]
    ok = (lab == -100) | ~same | (lab == tokens[:, 1:])
    assert bool(ok.all()), "a label inside a document differs from the next token"
    assert bool((pos[:, 1:][same] == pos[:, :-1][same] + 1).all())
    assert int(tokens.max()) < tok.vocab_size
