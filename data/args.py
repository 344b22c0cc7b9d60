"""DataArgs: every knob of the data path, as plain values, and the schema of the `data` config
group (configs/data/*.yaml keys map one-to-one onto these fields, as configs/model/*.yaml do
onto ModelArgs). Nothing here knows about Hydra. `validate()` runs before anything is built, so
a bad value stops the run with a message that names it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

KINDS = ("shards", "text", "passkey")
PASSKEY_FILLERS = ("repeat", "text")
PASSKEY_LOSSES = ("all", "key")
IMAGE_DTYPES = ("float32", "bfloat16", "float16")


def url_pieces(urls: Any) -> list[str]:
    """The single urls of a urls value (a string, `::`-joined pieces, or a list), stripped."""
    items = [urls] if isinstance(urls, str) else list(urls) if isinstance(urls, (list, tuple)) else []
    return [p.strip() for item in items for p in str(item).split("::")]


def _short(url: str) -> str:
    return repr(url if len(url) <= 120 else url[:120] + "...")


@dataclass
class Source:
    """One mixture component: shards and a relative weight (weights need not sum to 1)."""

    urls: Any = None  # str or list of str: a directory of .tar files, a brace pattern, a `pipe:` command
    weight: float = 1.0


@dataclass
class DataArgs:
    # What: webdataset shards through the early-fusion tokenizer, one text file as bytes, or
    # synthetic passkey-retrieval documents as bytes (data/passkey.py).
    kind: str = "shards"  # shards | text | passkey

    # Where: `urls` (one source) or `sources` (a weighted mixture), not both; with neither, the
    # built-in sample set ("sample", built into a cache directory on first use).
    urls: Any = None  # str or list of str: a directory, a brace pattern, a `pipe:` command, or "sample"
    sources: list[Source] = field(default_factory=list)
    path: str | None = None  # kind=text (and passkey_filler=text): a text file; None: Python's pydoc topics
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

    # kind=passkey: each document hides a number of passkey_digits digits at a random depth of
    # filler text and asks for it at the end. Filler: `repeat` (five short sentences over and
    # over: only the number is left to learn) or `text` (sentences of data.path, or pydoc).
    passkey_digits: int = 5
    passkey_filler: str = "repeat"  # repeat | text
    # all: every next token is a target; key: only the digits a model can find by looking back
    # (the key's repeat in the hidden sentence and the answer), so all the loss is retrieval.
    passkey_loss: str = "all"  # all | key

    # Packing
    reset_positions: bool = True  # positions restart at 0 for every document in a row

    # Images and video (Llama 4 geometry)
    max_tiles: int = 16  # local tiles per image; lowered automatically so an image fits in seq_len
    tile_size: int = 336
    patches_per_tile: int = 144
    video_fps: float = 1.0  # frames sampled per second of video
    video_max_frames: int = 8
    image_dtype: str = "float32"  # dtype of batch["images"]: float32 | bfloat16 | float16

    # Budgets. A sample that breaks one is skipped and counted under its own reason (batch["skipped"],
    # data/skipped/<reason> in metrics.jsonl), never an error that stops training; together they
    # bound a loader worker's memory and time whatever a shard holds. Checked as early as
    # possible: tar headers before a member is read, the document before any media is decoded.
    # docs/data.md "Budgets" gives the reasons and the worst case they allow.
    max_member_bytes: int = 64 << 20  # one tar member (member_too_large); never read when larger
    max_sample_bytes: int = 128 << 20  # the members one sample keeps in memory (sample_too_large)
    max_text_bytes: int = 4 << 20  # a sample's json + txt, ~1M tokens (text_too_long)
    max_media_per_sample: int = 48  # image/video references in one document (too_many_media)
    max_image_pixels: int = 50_000_000  # width*height of one image or video frame, from the header
    max_sample_pixels: int = 500_000_000  # pixels decoded for one sample: images + every video frame
    max_video_decode_frames: int = 2_000  # video frames decoded for one sample (too_many_frames)
    max_video_decode_seconds: float = 30.0  # time backstop (video_decode_timeout); not deterministic
    shuffle_buffer_bytes: int = 256 << 20  # a shuffle block also ends once its samples hold this many bytes

    # pipe:CMD urls run CMD through the shell; they are refused unless this is set.
    allow_pipe: bool = False

    def resolved_sources(self) -> list[Source]:
        if self.urls is not None and self.sources:
            raise ValueError(f"data: set either data.urls (one source; it is {self.urls!r}) or data.sources "
                             "(a mixture), not both")
        if self.sources:
            return [s if isinstance(s, Source) else Source(**s) for s in self.sources]
        return [Source("sample" if self.urls is None else self.urls, 1.0)]

    def validate(self) -> DataArgs:
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
            pipe = next((u for u in url_pieces(s.urls) if u.startswith("pipe:")), None)
            if pipe is not None and not self.allow_pipe:
                raise ValueError(
                    f"{where}: {_short(pipe)} runs a shell command; pipe: urls are refused unless you "
                    "opt in with data.allow_pipe=true (only for urls you trust)"
                )
        positive = [
            "shuffle_buffer",
            "max_tiles",
            "tile_size",
            "patches_per_tile",
            "video_max_frames",
            "max_member_bytes",
            "max_sample_bytes",
            "max_text_bytes",
            "max_media_per_sample",
            "max_image_pixels",
            "max_sample_pixels",
            "max_video_decode_frames",
            "shuffle_buffer_bytes",
        ]
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"data.{name}={getattr(self, name)} must be >= 1")
        if not self.video_fps > 0:
            raise ValueError(f"data.video_fps={self.video_fps} must be > 0")
        if not self.max_video_decode_seconds > 0:
            raise ValueError(f"data.max_video_decode_seconds={self.max_video_decode_seconds} must be > 0")
        if self.epochs is not None and self.epochs < 1:
            raise ValueError(f"data.epochs={self.epochs}: use None to loop forever or a count >= 1")
        if self.resample and self.epochs is not None:
            raise ValueError("data.resample=true draws shards forever; it cannot be combined with data.epochs")
        if not 1 <= self.passkey_digits <= 18:
            raise ValueError(f"data.passkey_digits={self.passkey_digits} must be between 1 and 18")
        if self.passkey_filler not in PASSKEY_FILLERS:
            raise ValueError(f"data.passkey_filler={self.passkey_filler!r} is not one of {', '.join(PASSKEY_FILLERS)}")
        if self.passkey_loss not in PASSKEY_LOSSES:
            raise ValueError(f"data.passkey_loss={self.passkey_loss!r} is not one of {', '.join(PASSKEY_LOSSES)}")
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
            "shuffle_buffer_bytes",
        }
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name in keep}
        out["sources"] = [
            [s.urls if isinstance(s.urls, str) else list(s.urls), s.weight] for s in self.resolved_sources()
        ]
        return out
