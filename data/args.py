"""DataArgs: every knob of the multimodal data path, as plain values.

The training config maps onto these fields; nothing here knows about Hydra. `validate()`
runs when a loader is built, so a bad value stops the run with a message that names it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields


@dataclass
class Source:
    """One mixture component: shards and a relative weight (weights need not sum to 1)."""

    urls: str | list[str]  # a directory of .tar files, a brace pattern, a `pipe:` command, or a list
    weight: float = 1.0


@dataclass
class DataArgs:
    # Where: either `urls` (one source) or `sources` (a weighted mixture). "sample" means the
    # embedded sample shards, built into a cache directory on first use.
    urls: str | list[str] | None = None
    sources: list[Source] = field(default_factory=list)

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
            raise ValueError("data: set either urls (one source) or sources (a mixture), not both")
        if self.urls is not None:
            return [Source(self.urls, 1.0)]
        return [s if isinstance(s, Source) else Source(**s) for s in self.sources]

    def validate(self) -> None:
        sources = self.resolved_sources()
        if not sources:
            raise ValueError("data: no shards given: set data.urls (e.g. data.urls=sample) or data.sources")
        for i, s in enumerate(sources):
            if not s.urls:
                raise ValueError(f"data.sources[{i}].urls is empty")
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
        if self.image_dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"data.image_dtype={self.image_dtype!r}: use float32, bfloat16 or float16")

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
