"""Pack tokenized documents into fixed [batch_size, seq_len] rows.

Per row position t:
  tokens[t]     the token
  labels[t]     the token the model should predict at t (loss = CE(logits[b, t], labels[b, t])):
                the document's next token, or -100 where that is a media token, at the end of
                a document and on padding
  positions[t]  position within the document fragment (restarts at 0 per document when
                reset_positions, else the index in the row)
  doc_ids[t]    0, 1, 2, ... per document fragment in the row; padding is -1
A document longer than the room left continues in the next row (its labels stay the true
next tokens across the cut; the continuation starts at position 0 like a new document, which
is all the model can see of it). An image block (<|image_start|> ... <|image_end|>) is never
cut: if it does not fit, the row is padded and the block starts the next row, so every tile's
144 <|patch|> slots sit in one row and `images` lists tiles in row-major order.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from data.tokenizer import IGNORE_INDEX, TokenizedDocument

PAD_DOC_ID = -1


class Packer:
    def __init__(
        self,
        batch_size: int,
        seq_len: int,
        pad_id: int,
        reset_positions: bool = True,
        tile_shape: tuple[int, int, int] = (3, 336, 336),
        image_dtype: torch.dtype = torch.float32,
    ):
        if batch_size < 1 or seq_len < 2:
            raise ValueError(f"batch_size={batch_size} and seq_len={seq_len} must be >= 1 and >= 2")
        self.batch_size, self.seq_len, self.pad_id = batch_size, seq_len, pad_id
        self.reset_positions = reset_positions
        self.tile_shape, self.image_dtype = tile_shape, image_dtype
        self.doc: TokenizedDocument | None = None  # the document being packed (carried across batches)
        self.offset = 0  # tokens of self.doc already packed
        self.dropped_media = 0  # documents cut short because one image block exceeds seq_len
        self.exhausted = False

    def set_carry(self, doc: TokenizedDocument | None, offset: int) -> None:
        self.doc, self.offset = doc, offset

    def _take(self, room: int) -> int:
        """How many tokens of the current document go into a row with `room` free slots."""
        doc, start = self.doc, self.offset
        end = min(len(doc), start + room)
        for s, e in doc.spans:
            if s < end < e:  # the cut would fall inside an image block: stop before it
                return max(s - start, 0)
        return end - start

    def next_batch(self, next_doc: Callable[[], TokenizedDocument | None]) -> dict | None:
        """Fill batch_size rows, pulling documents from next_doc() (None: no more). Returns None
        once nothing is left."""
        if self.exhausted and self.doc is None:
            return None
        B, T = self.batch_size, self.seq_len
        tokens = np.full((B, T), self.pad_id, dtype=np.int64)
        labels = np.full((B, T), IGNORE_INDEX, dtype=np.int64)
        positions = np.zeros((B, T), dtype=np.int64)
        doc_ids = np.full((B, T), PAD_DOC_ID, dtype=np.int64)
        tiles: list[torch.Tensor] = []
        for r in range(B):
            t, frag = 0, 0
            while t < T:
                if self.doc is None:
                    if self.exhausted:
                        break
                    self.doc, self.offset = next_doc(), 0
                    if self.doc is None:
                        self.exhausted = True
                        break
                take = self._take(T - t)
                if take == 0:
                    if t > 0:
                        break  # the next image block starts the next row
                    # An empty row cannot hold the block: drop the rest of this document.
                    self.dropped_media += 1
                    self.doc = None
                    continue
                a, b = self.offset, self.offset + take
                tokens[r, t : t + take] = self.doc.tokens[a:b]
                labels[r, t : t + take] = self.doc.targets[a:b]
                positions[r, t : t + take] = np.arange(take) if self.reset_positions else np.arange(t, t + take)
                doc_ids[r, t : t + take] = frag
                tiles.extend(self._tiles_between(a, b))
                self.offset, t, frag = b, t + take, frag + 1
                if self.offset >= len(self.doc):
                    self.doc = None
            if t == 0 and self.exhausted:
                if r == 0:
                    return None
                break
        images = (
            torch.cat(tiles).to(self.image_dtype) if tiles else torch.empty(0, *self.tile_shape, dtype=self.image_dtype)
        )
        return {
            "tokens": torch.from_numpy(tokens),
            "labels": torch.from_numpy(labels),
            "positions": torch.from_numpy(positions),
            "doc_ids": torch.from_numpy(doc_ids),
            "images": images,
        }

    def _tiles_between(self, a: int, b: int) -> list[torch.Tensor]:
        out, first = [], 0
        for (s, e), n in zip(self.doc.spans, self.doc.span_tiles):
            if a <= s and e <= b:
                out.append(self.doc.pixels[first : first + n])
            first += n
        return out
