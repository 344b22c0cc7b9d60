"""Early-fusion tokenizer: tiktoken BPE for text, Llama 4 special tokens, and the media layout.

Text uses a tiktoken-format `tokenizer.model` (the format of the released Llama 3/4
tokenizers: `base64(token) rank` per line). Special tokens follow Llama 4's list and order;
they sit right after the BPE vocabulary, so special id = base_vocab + (llama4_id - 200000).
The real tokenizer has base 200000 and 2048 specials (vocab 202048); the shipped tiny one has
base 4096 and 256 specials (vocab 4352) — the first 256 of the same list, which still holds
every token this pipeline emits.

Images are laid out exactly as Llama 4 (transformers' Llama4Processor._prompt_split_image):
  <|image_start|> [rows of tiles: (<|patch|>*144 <|tile_x_separator|>)... <|patch|>*144
  <|tile_y_separator|>] <|image|> <|patch|>*144 <|image_end|>
The tile rows appear only when there is more than one tile; the <|image|> group is the
global view (or the only tile). Videos are herd's own layout, documented in docs/data.md:
  <|video_start|> (one single-tile image block per sampled frame) <|video_end|>
where <|video_start|>/<|video_end|> are Llama 4's first two reserved vision tokens.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tiktoken
import torch

from data.specials import (  # noqa: F401 - re-exported: the tokenizer's public names
    LLAMA4_NAMED_SPECIAL_TOKENS,
    VIDEO_END,
    VIDEO_START,
    special_token_count,
    special_token_names,
)
from data.vision import ImageTiles, VideoFrames

IGNORE_INDEX = -100
PATCHES_PER_TILE = 144  # (336 / 14)^2 patches, pixel-shuffled by 0.5 -> 576 / 4

# Llama 4's pre-tokenisation regex (o200k style).
O200K_PATTERN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def load_mergeable_ranks(path: str | Path) -> dict[bytes, int]:
    """Parse a tiktoken-format file. (tiktoken's own loader caches by path in a temp dir,
    which would serve a stale file after it changes; this one always reads the file.)"""
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(Path(path).read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except Exception as exc:
            raise ValueError(f"{path}:{lineno}: expected 'base64-token rank', got {line[:80]!r}") from exc
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: ranks must be 0..{len(ranks) - 1} without gaps or duplicates")
    return ranks


@dataclass(frozen=True)
class SpecialIds:
    bos: int
    eos: int
    eot: int
    pad: int
    image_start: int
    image_end: int
    tile_x: int
    tile_y: int
    image: int
    patch: int
    video_start: int
    video_end: int


def tiny_tokenizer_path() -> Path:
    return Path(__file__).parent / "assets" / "tiny.tokenizer.model"


class Tokenizer:
    """Text BPE + Llama 4 special ids. `Tokenizer.tiny()` loads the shipped tiny tokenizer."""

    # tiktoken panics on very long inputs and very long runs without whitespace.
    _MAX_CHARS = 400_000
    _MAX_RUN = 25_000

    def __init__(self, model_path: str | Path, num_special_tokens: int | None = None):
        ranks = load_mergeable_ranks(model_path)
        self.base_vocab = len(ranks)
        if num_special_tokens is None:
            num_special_tokens = special_token_count(self.base_vocab)
        if num_special_tokens < 93:
            raise ValueError(f"num_special_tokens={num_special_tokens}: at least 93 are needed to reach <|patch|>")
        names = special_token_names(num_special_tokens)
        self.special_tokens = {name: self.base_vocab + i for i, name in enumerate(names)}
        self.vocab_size = self.base_vocab + num_special_tokens
        self.model = tiktoken.Encoding(
            name=Path(model_path).name, pat_str=O200K_PATTERN, mergeable_ranks=ranks, special_tokens=self.special_tokens
        )
        s = self.special_tokens
        self.ids = SpecialIds(
            bos=s["<|begin_of_text|>"],
            eos=s["<|end_of_text|>"],
            eot=s["<|eot|>"],
            pad=s["<|finetune_right_pad|>"],
            image_start=s["<|image_start|>"],
            image_end=s["<|image_end|>"],
            tile_x=s["<|tile_x_separator|>"],
            tile_y=s["<|tile_y_separator|>"],
            image=s["<|image|>"],
            patch=s["<|patch|>"],
            video_start=s[VIDEO_START],
            video_end=s[VIDEO_END],
        )

    @classmethod
    def tiny(cls) -> "Tokenizer":
        return cls(tiny_tokenizer_path(), num_special_tokens=256)

    @classmethod
    def load(cls, spec: str | Path, num_special_tokens: int | None = None) -> "Tokenizer":
        """`spec` is "tiny" or a path to a tiktoken-format tokenizer.model."""
        if str(spec) == "tiny":
            return cls.tiny()
        if not Path(spec).is_file():
            raise FileNotFoundError(f"tokenizer {spec!r} not found: give 'tiny' or the path of a tokenizer.model")
        return cls(spec, num_special_tokens)

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Ordinary text: strings that look like special tokens are encoded as plain text, so
        data cannot inject <|patch|> or <|image|>."""
        ids = [self.ids.bos] if bos else []
        for chunk in self._chunks(text):
            ids.extend(self.model.encode_ordinary(chunk))
        if eos:
            ids.append(self.ids.eos)
        return ids

    def decode(self, ids) -> str:
        return self.model.decode([int(i) for i in ids])

    def _chunks(self, text: str):
        for start in range(0, len(text), self._MAX_CHARS):
            piece = text[start : start + self._MAX_CHARS]
            begin, run, space = 0, 0, None
            for i, ch in enumerate(piece):
                is_space = ch.isspace()
                run = run + 1 if is_space == space else 1
                space = is_space
                if run > self._MAX_RUN:
                    yield piece[begin:i]
                    begin, run = i, 1
            yield piece[begin:]


def image_token_ids(ids: SpecialIds, grid: tuple[int, int], patches: int = PATCHES_PER_TILE) -> list[int]:
    """Llama 4's token layout of one image whose local tiles form a grid (rows, cols)."""
    rows, cols = grid
    out = [ids.image_start]
    if rows * cols > 1:
        for _ in range(rows):
            for x in range(cols):
                out += [ids.patch] * patches
                if x < cols - 1:
                    out.append(ids.tile_x)
            out.append(ids.tile_y)
    out += [ids.image] + [ids.patch] * patches + [ids.image_end]
    return out


def image_block_length(grid: tuple[int, int], patches: int = PATCHES_PER_TILE) -> int:
    rows, cols = grid
    local = rows * cols * patches + rows * cols if rows * cols > 1 else 0  # patches + separators
    return 1 + local + 1 + patches + 1


@dataclass
class TokenizedDocument:
    """One document in early-fusion form.

    tokens:  int64 [L], <|begin_of_text|> ... <|end_of_text|>
    targets: int64 [L], the next token, or -100 where the next token is a media token or at the end
    spans:   [start, end) of every image block (never split across rows when packed)
    span_tiles: tiles of each span, in order; pixels holds them in the same order
    pixels:  float [sum(span_tiles), 3, H, W]
    """

    tokens: np.ndarray
    targets: np.ndarray
    spans: list[tuple[int, int]]
    span_tiles: list[int]
    pixels: torch.Tensor

    def __len__(self) -> int:
        return len(self.tokens)


def encode_document(
    tok: Tokenizer, segments: list, tile_size: int = 336, patches: int = PATCHES_PER_TILE
) -> TokenizedDocument:
    """segments: str | ImageTiles | VideoFrames, in document order."""
    ids = tok.ids
    tokens: list[int] = [ids.bos]
    media: list[bool] = [False]
    spans: list[tuple[int, int]] = []
    span_tiles: list[int] = []
    pixels: list[torch.Tensor] = []

    def add_image(tiles: torch.Tensor, grid: tuple[int, int]) -> None:
        block = image_token_ids(ids, grid, patches)
        n = grid[0] * grid[1] + (1 if grid[0] * grid[1] > 1 else 0)
        assert tiles.shape[0] == n, (tiles.shape, grid)
        spans.append((len(tokens), len(tokens) + len(block)))
        span_tiles.append(n)
        pixels.append(tiles)
        tokens.extend(block)
        media.extend([True] * len(block))

    for seg in segments:
        if isinstance(seg, str):
            text_ids = tok.encode(seg)
            tokens.extend(text_ids)
            media.extend([False] * len(text_ids))
        elif isinstance(seg, ImageTiles):
            add_image(seg.pixels, seg.grid)
        elif isinstance(seg, VideoFrames):
            tokens.append(ids.video_start)
            media.append(True)
            for frame in seg.pixels:
                add_image(frame.unsqueeze(0), (1, 1))
            tokens.append(ids.video_end)
            media.append(True)
        else:
            raise TypeError(f"unknown segment type {type(seg).__name__}")
    tokens.append(ids.eos)
    media.append(False)

    tokens_np = np.asarray(tokens, dtype=np.int64)
    media_np = np.asarray(media, dtype=bool)
    targets = np.full_like(tokens_np, IGNORE_INDEX)
    targets[:-1] = np.where(media_np[1:], IGNORE_INDEX, tokens_np[1:])
    if pixels:
        pix = torch.cat(pixels)
    else:
        pix = torch.empty(0, 3, tile_size, tile_size)
    return TokenizedDocument(tokens_np, targets, spans, span_tiles, pix)
