"""The embedded sample dataset: small, deterministic webdataset shards built from material
that ships with the dependencies, so `data.urls=sample` trains on a fresh machine offline.

Text is the English of Python's `pydoc_data.topics`; images are scikit-image's sample images
(skimage.data), cropped and resized to cover one-tile, wide, tall and 2x2 layouts; videos are
short pans across those images encoded with PyAV (mp4/MPEG-4 Part 2 and webm/VP8). Samples are
plain text (`.txt`), interleaved documents (`.json` + media) and image-caption pairs
(`.jpg` + `.txt`), spread over 8 shards so 2 ranks x 2 workers each get two.
The same text trains the shipped tiny tokenizer (`train_tiny_tokenizer`).
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
import shutil
import time
import uuid
from pathlib import Path

import numpy as np
from PIL import Image

log = logging.getLogger("herd")

SAMPLE_VERSION = 1
SAMPLE_SHARDS = 8
_IMAGES = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "hubble_deep_field",
    "retina",
    "colorwheel",
    "immunohistochemistry",
    "logo",
    "camera",
    "coins",
    "page",
    "clock",
    "moon",
)


def sample_texts() -> list[tuple[str, str]]:
    """(topic, text) for every pydoc topic, in sorted order."""
    from pydoc_data.topics import topics

    return [(name, topics[name].strip()) for name in sorted(topics)]


def sample_corpus() -> str:
    return "\n\n".join(text for _, text in sample_texts())


def train_tiny_tokenizer(path: str | Path, vocab_size: int = 4096) -> None:
    """Rebuild data/assets/tiny.tokenizer.model (256 bytes + 3840 merges) from the sample text."""
    from data.bpe import save_tiktoken_model, train_bpe

    save_tiktoken_model(train_bpe(sample_corpus(), vocab_size), path)


def sample_image(name: str) -> Image.Image:
    import skimage.data

    arr = getattr(skimage.data, name)()
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    return Image.fromarray(arr)


def image_variant(img: Image.Image, k: int) -> Image.Image:
    """Deterministic crops/resizes: k % 5 picks one-tile, wide, tall, 2x2-sized or tiny."""
    w, h = img.size
    kind = k % 5
    if kind == 1:  # wide: a 2:1 band
        band = min(h, w // 2)
        img, size = img.crop((0, (h - band) // 2, 2 * band, (h + band) // 2)), (560, 280)
    elif kind == 2:  # tall: a 1:2 strip
        strip = min(w, h // 2)
        img, size = img.crop(((w - strip) // 2, 0, (w + strip) // 2, 2 * strip)), (240, 480)
    elif kind == 3:  # big square: four tiles
        side = min(w, h)
        img, size = img.crop(((w - side) // 2, (h - side) // 2, (w + side) // 2, (h + side) // 2)), (600, 600)
    elif kind == 4:
        size = (128, max(1, 128 * h // w))
    else:
        size = (320, max(1, 320 * h // w))
    return img.resize(size, Image.Resampling.BILINEAR)


def encode_image(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "jpg":
        img.convert("RGB").save(buf, format="JPEG", quality=75)
    elif fmt == "webp":
        img.save(buf, format="WEBP", quality=70, method=4)
    else:  # photos make large PNGs: keep those small
        img.thumbnail((256, 256), Image.Resampling.BILINEAR)
        img.save(buf, format="PNG")
    return buf.getvalue()


def pan_video(
    img: Image.Image, fmt: str = "mp4", frames: int = 12, fps: int = 6, size: tuple[int, int] = (160, 120)
) -> bytes:
    """A short camera pan across `img`: `frames` crops sliding left to right."""
    import av

    img = img.convert("RGB")
    w, h = img.size
    cw, ch = min(w, h * size[0] // size[1]), min(h, w * size[1] // size[0])
    buf = io.BytesIO()
    # bitexact: no random segment ids or encoder dates, so the bytes are reproducible
    with av.open(buf, mode="w", format="mp4" if fmt == "mp4" else "webm", options={"fflags": "+bitexact"}) as out:
        stream = out.add_stream("mpeg4" if fmt == "mp4" else "libvpx", rate=fps)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        stream.thread_count = 1  # threaded encoders are not bit-reproducible
        if fmt == "webm":
            stream.bit_rate = 200_000
        for i in range(frames):
            x = (w - cw) * i // max(frames - 1, 1)
            frame = img.crop((x, (h - ch) // 2, x + cw, (h - ch) // 2 + ch)).resize(size, Image.Resampling.BILINEAR)
            for packet in stream.encode(av.VideoFrame.from_image(frame)):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


def _paragraphs(text: str, limit: int = 700) -> list[str]:
    paras = [p.strip() for p in text.split("\n\n") if p.strip()]
    return [p[:limit] for p in paras] or [text[:limit]]


def sample_documents() -> list[dict]:
    """Every sample of the sample set as webdataset dicts, in a fixed order."""
    texts = sample_texts()
    images = [sample_image(n) for n in _IMAGES]
    samples: list[dict] = [{"__key__": f"text-{i:04d}", "txt": text} for i, (_, text) in enumerate(texts)]
    layouts = [["t", "i", "t"], ["i", "t", "i", "t"], ["t", "v", "t"], ["t", "i", "v", "t"]]
    fmts = ["jpg", "png", "jpg", "webp"]
    for j in range(32):
        paras = _paragraphs(texts[(7 * j + 3) % len(texts)][1])
        doc, sample, n_media, n_text = [], {"__key__": f"doc-{j:04d}"}, 0, 0
        for part in layouts[j % len(layouts)]:
            if part == "t":
                doc.append({"text": "\n\n".join(paras[n_text : n_text + 2]) or paras[0]})
                n_text += 2
                continue
            src = images[(3 * j + n_media) % len(images)]
            if part == "i":
                ext = f"{n_media}.{fmts[(j + n_media) % len(fmts)]}"
                sample[ext] = encode_image(image_variant(src, j + n_media), ext.split(".")[1])
                doc.append({"image": ext})
            else:
                ext = f"{n_media}.{'mp4' if j % 8 < 4 else 'webm'}"
                sample[ext] = pan_video(src, ext.split(".")[1], frames=8 + j % 5)
                doc.append({"video": ext})
            n_media += 1
        sample["json"] = json.dumps({"segments": doc}, ensure_ascii=False)
        samples.append(sample)
    for j in range(12):
        name = _IMAGES[j % len(_IMAGES)]
        samples.append(
            {
                "__key__": f"caption-{j:04d}",
                "jpg": encode_image(image_variant(images[j % len(images)], 2 * j), "jpg"),
                "txt": f"A picture from scikit-image's sample data: {name.replace('_', ' ')}.",
            }
        )
    random.Random(SAMPLE_VERSION).shuffle(samples)  # mix kinds across shards, the same way every time
    return samples


def write_shards(
    samples, out_dir: str | Path, prefix: str = "shard", maxcount: int = 1000, maxsize: float = 1e9
) -> list[Path]:
    """Write samples (webdataset dicts) with webdataset.ShardWriter; returns the shard paths.
    Fixed mtime/owner make the bytes a pure function of the samples."""
    import webdataset as wds

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with wds.ShardWriter(
        str(out_dir / f"{prefix}-%06d.tar"),
        maxcount=maxcount,
        maxsize=maxsize,
        verbose=0,
        mtime=0,
        user="herd",
        group="herd",
    ) as sink:
        for sample in samples:
            sink.write(sample)
    return sorted(out_dir.glob(f"{prefix}-*.tar"))


def build_sample(out_dir: str | Path) -> list[Path]:
    return _write_sample(sample_documents(), out_dir)


def _write_sample(samples: list[dict], out_dir: str | Path) -> list[Path]:
    per_shard = -(-len(samples) // SAMPLE_SHARDS)
    return write_shards(samples, out_dir, prefix="sample", maxcount=per_shard)


def default_sample_dir() -> Path:
    root = os.environ.get("HERD_DATA_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "herd")
    return Path(root) / f"sample-v{SAMPLE_VERSION}"


def ensure_sample(out_dir: str | Path | None = None) -> Path:
    """Build the sample shards into out_dir unless a complete copy is there; returns the dir.
    Safe when several processes call it at once (ranks, or hosts sharing the cache): each
    builds into a directory of its own beside out_dir and renames it into place; the rename is
    atomic, so out_dir only ever exists complete, and the first one wins."""
    out_dir = Path(out_dir) if out_dir is not None else default_sample_dir()
    marker = out_dir / "COMPLETE"
    if marker.exists():
        return out_dir
    log.info(f"data: building the sample shards in {out_dir} (first use; set HERD_DATA_CACHE to move the cache)")
    start = time.perf_counter()
    tmp = out_dir.with_name(f"{out_dir.name}.tmp-{uuid.uuid4().hex}")  # unique even across hosts
    try:
        samples = sample_documents()
        shards = _write_sample(samples, tmp)
        (tmp / "COMPLETE").write_text(f"herd sample v{SAMPLE_VERSION}\n")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        os.rename(tmp, out_dir)  # atomic; fails if another process's copy is already in place
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not marker.exists():  # no complete copy there either: something else is in the way
            raise RuntimeError(
                f"data: {out_dir} exists but is not a complete sample set; delete it and rerun"
            ) from None
        log.info(f"data: another process finished the sample shards in {out_dir} first; using those")
        return out_dir
    log.info(
        f"data: built {len(shards)} sample shards ({len(samples)} documents) in {out_dir} "
        f"in {time.perf_counter() - start:.1f} s"
    )
    return out_dir
