"""Pixels for the vision encoder: Llama 4's resize-and-tile, plus video frames as tiles.

Mirrors transformers' Llama4ImageProcessor so a model trained here sees what the released
processor produces: pick the tile canvas (rows x cols of 336px tiles, rows*cols <= max_tiles)
that needs the least up- or down-scaling, resize without distortion (never upscaling a side
past one tile unless the image is smaller than a tile), pad right/bottom with black, scale to
[0, 1], normalise with mean = std = 0.5, cut into tiles row-major, and append a global view
(the whole image squashed to one tile) when there is more than one tile.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from PIL import Image

TILE_SIZE = 336
IMAGE_MEAN = 0.5
IMAGE_STD = 0.5


@dataclass
class ImageTiles:
    pixels: torch.Tensor  # [rows*cols (+1 global view when rows*cols > 1), 3, tile, tile]
    grid: tuple[int, int]  # (rows, cols) of local tiles


@dataclass
class VideoFrames:
    pixels: torch.Tensor  # [frames, 3, tile, tile], one tile per frame


@lru_cache(maxsize=16)
def supported_canvases(max_tiles: int, tile: int = TILE_SIZE) -> tuple[tuple[int, int], ...]:
    """All (height, width) canvases of whole tiles with at most max_tiles tiles, in the same
    order as Llama 4 (the order decides ties)."""
    by_ratio: dict[float, list[tuple[int, int]]] = defaultdict(list)
    for n in range(max_tiles, 0, -1):
        factors = sorted({d for i in range(1, int(n**0.5) + 1) if n % i == 0 for d in (i, n // i)})
        for h in factors:
            by_ratio[h / (n // h)].append((h, n // h))
    return tuple((h * tile, w * tile) for pairs in by_ratio.values() for h, w in pairs)


def best_canvas(size: tuple[int, int], canvases, resize_to_max_canvas: bool = False) -> tuple[int, int]:
    """The canvas an image of `size` (h, w) is fitted into (Llama 4's get_best_fit)."""
    h, w = size
    scales = [min(ch / h, cw / w) for ch, cw in canvases]
    up = [s for s in scales if s >= 1]
    if up:
        chosen = max(up) if resize_to_max_canvas else min(up)
    else:
        chosen = max(scales)
    candidates = [c for c, s in zip(canvases, scales) if s == chosen]
    return min(candidates, key=lambda c: c[0] * c[1])  # first of the smallest area


def fit_without_distortion(size: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
    h, w = size
    th, tw = target
    sw, sh = tw / w, th / h
    if sw < sh:
        return max(min(math.floor(h * sw), th), 1), max(tw, 1)
    return max(th, 1), max(min(math.floor(w * sh), tw), 1)


def _to_normalized(img: Image.Image) -> torch.Tensor:
    arr = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)
    return (arr.float() / 255.0 - IMAGE_MEAN) / IMAGE_STD


def tile_image(img: Image.Image, max_tiles: int, tile: int = TILE_SIZE, dtype=torch.float32) -> ImageTiles:
    """Resize, pad, normalise and cut an RGB image into Llama 4 tiles (+ global view)."""
    if img.mode != "RGB":
        raise ValueError(f"tile_image needs an RGB image, got mode {img.mode}")
    size = (img.height, img.width)
    canvas = best_canvas(size, supported_canvases(max_tiles, tile))
    # Llama 4 never upscales a side past one tile here (it keeps small images small).
    limit = (min(max(size[0], tile), canvas[0]), min(max(size[1], tile), canvas[1]))
    new_h, new_w = fit_without_distortion(size, limit)
    resized = img.resize((new_w, new_h), Image.Resampling.BILINEAR) if (new_h, new_w) != size else img
    padded = torch.full((3, canvas[0], canvas[1]), -IMAGE_MEAN / IMAGE_STD)  # black after normalising
    padded[:, :new_h, :new_w] = _to_normalized(resized)
    rows, cols = canvas[0] // tile, canvas[1] // tile
    tiles = padded.reshape(3, rows, tile, cols, tile).permute(1, 3, 0, 2, 4).reshape(rows * cols, 3, tile, tile)
    if rows * cols > 1:
        global_view = _to_normalized(img.resize((tile, tile), Image.Resampling.BILINEAR)).unsqueeze(0)
        tiles = torch.cat([tiles, global_view])
    return ImageTiles(tiles.to(dtype).contiguous(), (rows, cols))


def frames_to_tiles(frames: list[Image.Image], tile: int = TILE_SIZE, dtype=torch.float32) -> VideoFrames:
    """Each frame becomes one tile, fitted and padded like a one-tile image."""
    pixels = [tile_image(f, max_tiles=1, tile=tile, dtype=dtype).pixels for f in frames]
    return VideoFrames(torch.cat(pixels) if pixels else torch.empty(0, 3, tile, tile, dtype=dtype))


def max_tiles_for_length(max_tiles: int, max_tokens: int, patches: int) -> int:
    """The largest tile budget <= max_tiles whose every image block fits in max_tokens."""
    from data.tokenizer import image_block_length  # local: tokenizer imports this module

    while max_tiles > 1:
        worst = max(
            image_block_length((h // TILE_SIZE, w // TILE_SIZE), patches) for h, w in supported_canvases(max_tiles)
        )
        if worst <= max_tokens:
            break
        max_tiles -= 1
    return max_tiles
