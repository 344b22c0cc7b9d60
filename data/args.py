"""DataArgs: every knob of the data path, as plain values, and the schema of the `data` config
group (configs/data/*.yaml keys map one-to-one onto these fields, as configs/model/*.yaml do
onto ModelArgs). Nothing here knows about Hydra. `validate()` runs before anything is built, so
a bad value stops the run with a message that names it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

KINDS = ("shards", "text")
IMAGE_DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class Source:
    """One mixture component: shards and a relative weight (weights need not sum to 1)."""

    urls: Any = None  # str or list of str: a directory of .tar files, a brace pattern, a `pipe:` command
    weight: float = 1.0


@dataclass
class DataArgs:
    # What: webdataset shards through the early-fusion tokenizer, or one text file as bytes.
    kind: str = "shards"  # shards | text

    # Where: `urls` (one source) or `sources` (a weighted mixture), not both; with neither, the
    # built-in sample set ("sample", built into a cache directory on first use).
    urls: Any = None  # str or list of str: a directory, a brace pattern, a `pipe:` command, or "sample"
    sources: list[Source] = field(default_factory=list)
    path: str | None = None  # kind=text: a text file; None: the English text of Python's pydoc topics
    num_workers: int = 2  # loader processes per rank (0: in the training process)

    # Text
    tokenizer: str = "tiny"  # "tiny" (shipped, vocab 4352) or the path of a tiktoken-format tokenizer.model
    num_special_tokens: int | None = None  # None: 2048 for a >=100k base vocabulary, else 256

    # Order. Shards are shuffled per epoch and samples in blocks of `shuffle_buffer`, both seeded,
    # so the order is a pure function of (seed, rank, worker) and can be resumed exactly.
    shuffle: bool = True
    shuffle_buffer: int = 64
    resample: bool = False  # draw shards with replacement, forever (no epochs)
    epochs: int | None = None  # None: loop forever (training); N: stop after N passes

    # Packing
    reset_positions: bool = True  # positions restart at 0 for every document in a row

    # Images and video (Llama 4 geometry)
    max_tiles: int = 16  # local tiles per image; lowered automatically so an image fits in seq_len
    tile_size: int = 336
    patches_per_tile: int = 144
    video_fps: float = 1.0  # frames sampled per second of video
    video_max_frames: int = 8
    image_dtype: str = "float32"  # dtype of batch["images"]: float32 | bfloat16 | float16

    # Safety limits: a sample that breaks one is skipped and counted, never decoded.
    max_image_pixels: int = 50_000_000  # width*height, checked from the header before decoding
    max_video_decode_frames: int = 2_000  # stop decoding a video after this many frames

    def resolved_sources(self) -> list[Source]:
        if self.urls is not None and self.sources:
            raise ValueError(f"data: set either data.urls (one source; it is {self.urls!r}) or data.sources "
                             "(a mixture), not both")
        if self.sources:
            return [s if isinstance(s, Source) else Source(**s) for s in self.sources]
        return [Source("sample" if self.urls is None else self.urls, 1.0)]

    def validate(self) -> "DataArgs":
        if self.kind not in KINDS:
            raise ValueError(f"data.kind={self.kind!r} is not one of {', '.join(KINDS)}")
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers={self.num_workers} must be >= 0")
        for i, s in enumerate(self.resolved_sources()):
            where = "data.urls" if not self.sources else f"data.sources[{i}].urls"
            if not s.urls or not isinstance(s.urls, (str, list, tuple)):
                raise ValueError(f"{where}={s.urls!r}: give a directory of .tar shards, a brace pattern "
                                 "(/d/shard-{000..099}.tar), pipe:CMD, a list of these, or sample")
            if not s.weight > 0:
                raise ValueError(f"data.sources[{i}].weight={s.weight}: weights must be > 0")
        positive = [
            "shuffle_buffer",
            "max_tiles",
            "tile_size",
            "patches_per_tile",
            "video_max_frames",
            "max_image_pixels",
            "max_video_decode_frames",
        ]
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"data.{name}={getattr(self, name)} must be >= 1")
        if not self.video_fps > 0:
            raise ValueError(f"data.video_fps={self.video_fps} must be > 0")
        if self.epochs is not None and self.epochs < 1:
            raise ValueError(f"data.epochs={self.epochs}: use None to loop forever or a count >= 1")
        if self.resample and self.epochs is not None:
            raise ValueError("data.resample=true draws shards forever; it cannot be combined with data.epochs")
        if self.image_dtype not in IMAGE_DTYPES:
            raise ValueError(f"data.image_dtype={self.image_dtype!r}: use {', '.join(IMAGE_DTYPES)}")
        return self

    def fingerprint(self) -> dict:
        """The fields that decide the sample order; a resumed loader must match them."""
        keep = {
            "shuffle",
            "shuffle_buffer",
            "resample",
            "epochs",
            "tokenizer",
            "max_tiles",
            "video_fps",
            "video_max_frames",
            "reset_positions",
        }
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name in keep}
        out["sources"] = [
            [s.urls if isinstance(s.urls, str) else list(s.urls), s.weight] for s in self.resolved_sources()
        ]
        return out
