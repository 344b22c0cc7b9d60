"""Raw webdataset samples -> document segments (text, image tiles, video frames).

Only these member types are ever decoded: json, txt, jpg/jpeg/png/webp (Pillow, restricted to
those formats) and mp4/webm (PyAV). Nothing is unpickled. Every way a sample can be bad
raises SkipSample(reason); the stream counts the reason and moves on. That includes every
budget (DecodeOptions): text bytes and media references are checked before any media is
decoded, each image's pixels from its header before it is decoded, and video frames, pixels
and time as frames come out of the decoder.

A sample is either an interleaved document, `<key>.json` = {"segments": [{"text": str} |
{"image": member} | {"video": member}, ...]} where a member is named by its extension after
the key ("jpg", "0.png") or by its full name ("<key>.0.png"); or a plain `<key>.txt`,
optionally with image/video members that go before the text (image-caption pairs).
"""

from __future__ import annotations

import io
import json
import math
import time
from dataclasses import dataclass

import torch
from PIL import Image

from data.vision import ImageTiles, VideoFrames, frames_to_tiles, tile_image

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
VIDEO_EXTS = ("mp4", "webm")
TEXT_EXTS = ("json", "txt")
DECODED_EXTS = TEXT_EXTS + IMAGE_EXTS + VIDEO_EXTS  # members of other types are never read
PIL_FORMATS = ["JPEG", "PNG", "WEBP"]

SKIP_REASONS = (
    "unreadable_shard",
    "truncated_tar",
    "no_document",
    "invalid_json",
    "invalid_text",
    "missing_member",
    "unsupported_media",
    "corrupt_image",
    "image_too_large",
    "corrupt_video",
    "video_too_large",
    "empty_document",
    "media_too_long",
    # budgets (DataArgs.max_*), and malformed sample grouping
    "member_too_large",
    "sample_too_large",
    "text_too_long",
    "too_many_media",
    "too_many_pixels",
    "too_many_frames",
    "video_decode_timeout",
    "duplicate_member",
    "duplicate_key",
)


class SkipSample(Exception):
    def __init__(self, reason: str, detail: str = ""):
        assert reason in SKIP_REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass(frozen=True)
class DecodeOptions:
    max_tiles: int = 16
    tile_size: int = 336
    video_fps: float = 1.0
    video_max_frames: int = 8
    max_image_pixels: int = 50_000_000
    max_video_decode_frames: int = 2_000  # per sample
    dtype: torch.dtype = torch.float32
    max_text_bytes: int = 4 << 20
    max_media_per_sample: int = 48
    max_sample_pixels: int = 500_000_000
    max_video_decode_seconds: float = 30.0


class Budget:
    """What decoding one sample has spent so far; raises SkipSample when a budget is exceeded."""

    def __init__(self, opts: DecodeOptions):
        self.opts = opts
        self.pixels = 0  # decoded: image sizes (before decoding) and every decoded video frame
        self.frames = 0  # decoded video frames, sampled or not
        self.video_seconds = 0.0

    def spend_pixels(self, n: int, what: str) -> None:
        self.pixels += n
        if self.pixels > self.opts.max_sample_pixels:
            raise SkipSample("too_many_pixels", f"{what} brings the sample to {self.pixels} > max_sample_pixels")

    def spend_frame(self, width: int, height: int, seconds: float) -> None:
        self.frames += 1
        if self.frames > self.opts.max_video_decode_frames:
            raise SkipSample("too_many_frames", f"> max_video_decode_frames={self.opts.max_video_decode_frames}")
        self.spend_pixels(width * height, f"video frame {self.frames} ({width}x{height})")
        if self.video_seconds + seconds > self.opts.max_video_decode_seconds:
            raise SkipSample(
                "video_decode_timeout",
                f"{self.frames} frames took > max_video_decode_seconds={self.opts.max_video_decode_seconds}",
            )


def _extension(name: str) -> str:
    return name.rsplit(".", 1)[-1].lower()


def open_image(data: bytes, max_pixels: int, budget: Budget | None = None) -> Image.Image:
    """Decode an image to RGB, refusing decompression bombs (and, with a budget, images the
    sample cannot afford) before any pixel is decoded."""
    try:
        img = Image.open(io.BytesIO(data), formats=PIL_FORMATS)
    except Image.DecompressionBombError as exc:
        raise SkipSample("image_too_large", str(exc)) from None
    except Exception as exc:
        raise SkipSample("corrupt_image", repr(exc)) from None
    if img.width * img.height > max_pixels:
        raise SkipSample("image_too_large", f"{img.width}x{img.height} > max_image_pixels={max_pixels}")
    if budget is not None:
        budget.spend_pixels(img.width * img.height, f"an image of {img.width}x{img.height}")
    try:
        img.load()
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            # transparent pixels become white, as transformers' convert_rgb does
            rgba = img.convert("RGBA")
            canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            canvas.alpha_composite(rgba)
            return canvas.convert("RGB")
        return img.convert("RGB")
    except Exception as exc:
        raise SkipSample("corrupt_image", repr(exc)) from None


def decode_video(data: bytes, opts: DecodeOptions, budget: Budget | None = None) -> VideoFrames:
    """Frames sampled every 1/video_fps seconds from the start, at most video_max_frames of
    them, each fitted into one tile as soon as it is decoded (full-size frames are not kept)."""
    import av  # imported here: text-only pipelines need not load FFmpeg

    budget = budget if budget is not None else Budget(opts)
    tiles: list[torch.Tensor] = []
    start = time.monotonic()
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            if not container.streams.video:
                raise SkipSample("corrupt_video", "no video stream")
            stream = container.streams.video[0]
            stream.thread_count = 1  # data workers are processes already; avoid oversubscription
            w, h = stream.codec_context.width, stream.codec_context.height
            if w * h > opts.max_image_pixels:
                raise SkipSample("video_too_large", f"{w}x{h} > max_image_pixels={opts.max_image_pixels}")
            rate = float(stream.average_rate or 25)
            t0, next_t = None, 0.0
            for i, frame in enumerate(container.decode(stream)):
                if frame.width * frame.height > opts.max_image_pixels:
                    raise SkipSample("video_too_large", f"frame {frame.width}x{frame.height}")
                budget.spend_frame(frame.width, frame.height, time.monotonic() - start)
                t = frame.time if frame.time is not None else i / rate
                t0 = t if t0 is None else t0
                if t - t0 + 1e-6 >= next_t:
                    tiles.append(frames_to_tiles([frame.to_image()], opts.tile_size, opts.dtype).pixels)
                    # the next sampling time after t (closed form: timestamps may jump far)
                    next_t = (math.floor((t - t0) * opts.video_fps + 1e-6) + 1) / opts.video_fps
                    if len(tiles) >= opts.video_max_frames:
                        break
    except SkipSample:
        raise
    except Exception as exc:
        raise SkipSample("corrupt_video", repr(exc)) from None
    finally:
        budget.video_seconds += time.monotonic() - start
    if not tiles:
        raise SkipSample("corrupt_video", "no decodable frame")
    return VideoFrames(torch.cat(tiles))


def member_ext(sample: dict, name: str) -> str:
    """The sample's member a media segment names: by the part after the key ("0.jpg") or by
    its full name ("<key>.0.jpg")."""
    if not isinstance(name, str) or not name:
        raise SkipSample("invalid_json", f"media reference {name!r} is not a member name")
    key = sample.get("__key__", "")
    base = key.rsplit("/", 1)[-1]
    ext = name.lower()
    for prefix in (key.lower() + ".", base.lower() + "."):
        if prefix != "." and ext.startswith(prefix):
            ext = ext[len(prefix) :]
    return ext


def _member(sample: dict, name: str, kinds: tuple[str, ...]) -> bytes:
    ext = member_ext(sample, name)
    if _extension(ext) not in kinds:
        raise SkipSample("unsupported_media", f"{name!r} is not one of {kinds}")
    data = sample.get(ext)
    if not isinstance(data, (bytes, bytearray)):
        raise SkipSample("missing_member", f"{sample.get('__key__', '')}: no member {name!r}")
    return data


def _media_members(sample: dict) -> list[str]:
    """A caption pair's media, in the order they go before the text."""
    return sorted(k for k in sample if not k.startswith("__") and _extension(k) in IMAGE_EXTS + VIDEO_EXTS)


def _check_text_size(sample: dict, opts: DecodeOptions) -> None:
    size = sum(len(v) for k, v in sample.items() if k in TEXT_EXTS and isinstance(v, (bytes, bytearray, str)))
    if size > opts.max_text_bytes:
        raise SkipSample("text_too_long", f"{size} bytes of json/txt > max_text_bytes={opts.max_text_bytes}")


def _parse_segments(sample: dict) -> list[tuple[str, str]]:
    """[(kind, value)] with kind in text|image|video; value is text or a member name."""
    if "json" in sample:
        try:
            doc = json.loads(sample["json"].decode("utf-8"))
        except Exception as exc:
            raise SkipSample("invalid_json", repr(exc)) from None
        segs = doc.get("segments") if isinstance(doc, dict) else None
        if not isinstance(segs, list):
            raise SkipSample("invalid_json", 'expected {"segments": [...]}')
        out = []
        for seg in segs:
            kinds = [k for k in ("text", "image", "video") if isinstance(seg, dict) and k in seg]
            if len(kinds) != 1 or not isinstance(seg[kinds[0]], str):
                raise SkipSample(
                    "invalid_json", f"segment {str(seg)[:80]} needs exactly one of text/image/video (a string)"
                )
            out.append((kinds[0], seg[kinds[0]]))
        return out
    if "txt" in sample:
        try:
            text = sample["txt"].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise SkipSample("invalid_text", repr(exc)) from None
        media = _media_members(sample)
        return [("image" if _extension(k) in IMAGE_EXTS else "video", k) for k in media] + [("text", text)]
    raise SkipSample("no_document", f"{sample.get('__key__')}: no .json or .txt member")


def drop_unused_members(sample: dict) -> dict:
    """The sample without the members its document does not use (the format lets a document
    come after its media, so they are read; this drops the unused ones before the sample
    waits in a shuffle block). A sample whose document is bad keeps only the document, which
    is all decode_sample needs to report it."""
    if "json" in sample:
        keep = {"json"}
        try:
            doc = json.loads(sample["json"])
            for seg in doc["segments"]:
                for kind in ("image", "video"):
                    if isinstance(seg, dict) and isinstance(seg.get(kind), str) and seg[kind]:
                        keep.add(member_ext(sample, seg[kind]))
        except Exception:
            pass
    elif "txt" in sample:
        keep = {"txt", *_media_members(sample)}
    else:
        keep = set()
    return {k: v for k, v in sample.items() if k.startswith("__") or k in keep}


def decode_sample(sample: dict, opts: DecodeOptions) -> list[str | ImageTiles | VideoFrames]:
    """A raw sample -> its segments, media decoded into tiles. Raises SkipSample."""
    _check_text_size(sample, opts)
    parsed = _parse_segments(sample)
    media = sum(kind != "text" for kind, _ in parsed)
    if media > opts.max_media_per_sample:
        raise SkipSample(
            "too_many_media", f"{media} media references > max_media_per_sample={opts.max_media_per_sample}"
        )
    budget = Budget(opts)
    segments: list[str | ImageTiles | VideoFrames] = []
    for kind, value in parsed:
        if kind == "text":
            if value:
                segments.append(value)
        elif kind == "image":
            img = open_image(_member(sample, value, IMAGE_EXTS), opts.max_image_pixels, budget)
            segments.append(tile_image(img, opts.max_tiles, opts.tile_size, opts.dtype))
            del img  # the full-size image goes before the next one is decoded
        else:
            segments.append(decode_video(_member(sample, value, VIDEO_EXTS), opts, budget))
    if not segments:
        raise SkipSample("empty_document", str(sample.get("__key__")))
    return segments
