"""The dense-mask attention herd used before segments, kept as the reference the segment path is
checked against. Built here from the definition, independently of model/attention.py:
mask[b, i, j] = j <= i and same document and (chunked layers) same floor(position / chunk)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def dense_masks(batch_size, seq_len, chunk_size, positions, doc_ids):
    """(global_mask, chunked_mask), boolean [B, 1, T, T], True where attention is allowed."""
    allowed = torch.ones(seq_len, seq_len, dtype=torch.bool).tril().expand(batch_size, seq_len, seq_len)
    if doc_ids is not None:
        allowed = allowed & (doc_ids[:, :, None] == doc_ids[:, None, :])
    if chunk_size is None:
        return allowed[:, None], allowed[:, None]
    if positions is None:
        positions = torch.arange(seq_len)
    chunk = (positions // chunk_size).expand(batch_size, seq_len)
    return allowed[:, None], (allowed & (chunk[:, :, None] == chunk[:, None, :]))[:, None]


class DenseLayout:
    """Drop-in for model.attention.AttentionLayout (same constructor and `attend`) that
    materialises both masks."""

    def __init__(self, batch_size, seq_len, chunk_size, positions, doc_ids, device=None):
        self.global_mask, self.chunked_mask = dense_masks(batch_size, seq_len, chunk_size, positions, doc_ids)

    def attend(self, q, k, v, chunked):
        mask = self.chunked_mask if chunked else self.global_mask
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=mask, enable_gqa=True)
        return out.transpose(1, 2)
