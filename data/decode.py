"""Raw webdataset samples -> document segments (text, image tiles, video frames).

Only these member types are ever decoded: json, txt, jpg/jpeg/png/webp (Pillow, restricted to
those formats) and mp4/webm (PyAV). Nothing is unpickled. Every way a sample can be bad
raises SkipSample(reason); the stream counts the reason and moves on.

A sample is either an interleaved document, `<key>.json` = {"segments": [{"text": str} |
{"image": member} | {"video": member}, ...]} where a member is named by its extension after
the key ("jpg", "0.png") or by its full name ("<key>.0.png"); or a plain `<key>.txt`,
optionally with image/video members that go before the text (image-caption pairs).
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass

import torch
from PIL import Image

from data.vision import ImageTiles, VideoFrames, frames_to_tiles, tile_image

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
VIDEO_EXTS = ("mp4", "webm")
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
    max_video_decode_frames: int = 2_000
    dtype: torch.dtype = torch.float32


def _extension(name: str) -> str:
    return name.rsplit(".", 1)[-1].lower()


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """Decode an image to RGB, refusing decompression bombs before any pixel is decoded."""
    try:
        img = Image.open(io.BytesIO(data), formats=PIL_FORMATS)
    except Image.DecompressionBombError as exc:
        raise SkipSample("image_too_large", str(exc)) from None
    except Exception as exc:
        raise SkipSample("corrupt_image", repr(exc)) from None
    if img.width * img.height > max_pixels:
        raise SkipSample("image_too_large", f"{img.width}x{img.height} > max_image_pixels={max_pixels}")
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


def decode_video(data: bytes, fps: float, max_frames: int, max_pixels: int, max_decode: int) -> list[Image.Image]:
    """Frames sampled every 1/fps seconds from the start, at most max_frames of them."""
    import av  # imported here: text-only pipelines need not load FFmpeg

    frames: list[Image.Image] = []
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            if not container.streams.video:
                raise SkipSample("corrupt_video", "no video stream")
            stream = container.streams.video[0]
            stream.thread_count = 1  # data workers are processes already; avoid oversubscription
            w, h = stream.codec_context.width, stream.codec_context.height
            if w * h > max_pixels:
                raise SkipSample("video_too_large", f"{w}x{h} > max_image_pixels={max_pixels}")
            rate = float(stream.average_rate or 25)
            t0, next_t = None, 0.0
            for i, frame in enumerate(container.decode(stream)):
                t = frame.time if frame.time is not None else i / rate
                t0 = t if t0 is None else t0
                if t - t0 + 1e-6 >= next_t:
                    if frame.width * frame.height > max_pixels:
                        raise SkipSample("video_too_large", f"frame {frame.width}x{frame.height}")
                    frames.append(frame.to_image())
                    # the next sampling time after t (closed form: timestamps may jump far)
                    next_t = (math.floor((t - t0) * fps + 1e-6) + 1) / fps
                    if len(frames) >= max_frames:
                        break
                if i + 1 >= max_decode:
                    break
    except SkipSample:
        raise
    except Exception as exc:
        raise SkipSample("corrupt_video", repr(exc)) from None
    if not frames:
        raise SkipSample("corrupt_video", "no decodable frame")
    return frames


def _member(sample: dict, name: str, kinds: tuple[str, ...]) -> bytes:
    if not isinstance(name, str) or not name:
        raise SkipSample("invalid_json", f"media reference {name!r} is not a member name")
    key = sample.get("__key__", "")
    base = key.rsplit("/", 1)[-1]
    ext = name.lower()
    for prefix in (key.lower() + ".", base.lower() + "."):
        if prefix != "." and ext.startswith(prefix):
            ext = ext[len(prefix) :]
    if _extension(ext) not in kinds:
        raise SkipSample("unsupported_media", f"{name!r} is not one of {kinds}")
    data = sample.get(ext)
    if not isinstance(data, (bytes, bytearray)):
        raise SkipSample("missing_member", f"{key}: no member {name!r}")
    return bytes(data)


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
        media = sorted(k for k in sample if not k.startswith("__") and _extension(k) in IMAGE_EXTS + VIDEO_EXTS)
        return [("image" if _extension(k) in IMAGE_EXTS else "video", k) for k in media] + [("text", text)]
    raise SkipSample("no_document", f"{sample.get('__key__')}: no .json or .txt member")


def decode_sample(sample: dict, opts: DecodeOptions) -> list[str | ImageTiles | VideoFrames]:
    """A raw sample -> its segments, media decoded into tiles. Raises SkipSample."""
    segments: list[str | ImageTiles | VideoFrames] = []
    for kind, value in _parse_segments(sample):
        if kind == "text":
            if value:
                segments.append(value)
        elif kind == "image":
            img = open_image(_member(sample, value, IMAGE_EXTS), opts.max_image_pixels)
            segments.append(tile_image(img, opts.max_tiles, opts.tile_size, opts.dtype))
        else:
            frames = decode_video(
                _member(sample, value, VIDEO_EXTS),
                opts.video_fps,
                opts.video_max_frames,
                opts.max_image_pixels,
                opts.max_video_decode_frames,
            )
            segments.append(frames_to_tiles(frames, opts.tile_size, opts.dtype))
    if not segments:
        raise SkipSample("empty_document", str(sample.get("__key__")))
    return segments
