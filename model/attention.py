"""iRoPE attention over packed rows without a T x T mask.

Every attention pattern herd needs is "causal within segments": each token attends to itself
and to the earlier tokens of its own segment, and to nothing else.

- NoPE (global) layers: a segment is a document (tokens of equal doc_id in a row).
- RoPE (chunked) layers: a segment is a (document, chunk) pair, the chunk counted on the
  positions given to the model: chunk = floor(position / attention_chunk_size).

A segment is described by a key per token (`document_keys`, `chunk_keys`); `causal_segments`
turns the keys of a batch into `Segments` once per forward (one host sync), and every layer then
runs `segment_attention(q, k, v, segments)`: the segments are gathered into a few batches of
similar length (padded at the end, so plain causal SDPA keeps real queries off the padding),
attended with SDPA's causal kernel (flash on CPU, flash or efficient on CUDA), and scattered
back. Memory is O(T) per row; no [T, T] tensor exists on any path.

Without positions and doc_ids, plain causal SDPA serves, and chunked layers whose chunks tile
the row exactly attend as independent rows (`chunked_by_reshape`).

Context parallelism (parallel/context.py) attends over the same segments with a layout of its
own: a rank's queries are runs inside segments whose earlier tokens other ranks hold, so each
run attends to the segment up to its end with `suffix_causal_attention`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

# Segments up to this length share one batch; above it, 8 padded lengths per octave, so padding
# adds less than 1/8 to the work of any segment that needs padding at all.
_SHORTEST_PAD = 16
_STEPS_PER_OCTAVE = 8


# ---------------------------------------------------------------- the dense kernels


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal grouped-query attention on token-major tensors: q [N, T, H, D], k/v [N, T, Hkv, D]
    -> [N, T, H, D]."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         is_causal=True, enable_gqa=True)
    return out.transpose(1, 2)


def suffix_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lower_right: bool) -> torch.Tensor:
    """Causal attention of the last Q of K tokens: q [N, Q, H, D], k/v [N, K, Hkv, D], Q <= K, query
    i sees keys j <= i + K - Q (aligned to the lower right). With `lower_right`, SDPA's
    `causal_lower_right` bias (flash attention on CUDA; a materialised [Q, K] mask elsewhere);
    without, Q must equal K and plain causal attention runs."""
    Q, K = q.shape[1], k.shape[1]
    if Q == K:
        return causal_attention(q, k, v)
    if not lower_right:
        raise ValueError(f"{Q} queries over {K} keys need lower_right=True")
    repeat = q.shape[2] // k.shape[2]  # the bias's kernels take equal head counts
    k, v = (t.repeat_interleave(repeat, dim=2).transpose(1, 2) for t in (k, v))
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=causal_lower_right(Q, K))
    return out.transpose(1, 2)


def chunked_by_reshape(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk: int) -> torch.Tensor:
    """Causal attention within consecutive chunks of a row whose length is a multiple of chunk:
    the chunks become rows of their own, no gather needed."""
    B, T = q.shape[:2]
    split = lambda t: t.unflatten(1, (T // chunk, chunk)).flatten(0, 1)  # noqa: E731
    return causal_attention(split(q), split(k), split(v)).unflatten(0, (B, T // chunk)).flatten(1, 2)


# ---------------------------------------------------------------- segment keys


def document_keys(doc_ids: torch.Tensor) -> torch.Tensor:
    """Global layers: a row's tokens with the same doc_id form one segment (padding's id too)."""
    return doc_ids


def chunk_keys(positions: torch.Tensor, doc_ids: torch.Tensor | None, chunk_size: int) -> torch.Tensor:
    """Chunked layers: one segment per (doc_id, floor(position / chunk_size)) in a row."""
    chunk = torch.div(positions, chunk_size, rounding_mode="floor")
    if doc_ids is None:
        return chunk
    chunk = chunk - chunk.amin()
    return doc_ids * (chunk.amax() + 1) + chunk


# ---------------------------------------------------------------- segments


@dataclass(frozen=True)
class Segments:
    """Where the causal segments of a [B, T] batch lie, in the form `segment_attention` consumes.

    groups: one index tensor [n, L] per batch of segments, into the flattened B * T token axis:
        row i holds one segment's tokens in order, padded at the end by repeating its last
        token (causality keeps real queries off the padding; padded outputs are dropped).
    source: [B * T], for each token, its row in the concatenation of the groups' flattened
        outputs.
    whole_rows: every row is a single segment, so plain causal attention serves.
    lengths: segment lengths, on the host (for statistics and tests)."""

    groups: tuple[torch.Tensor, ...]
    source: torch.Tensor
    whole_rows: bool
    lengths: torch.Tensor


def padded_lengths(lengths: torch.Tensor) -> torch.Tensor:
    """The length each segment is batched under: 16 for the shortest, else rounded up on a
    ladder of 8 steps per octave."""
    octave = torch.log2(lengths.double()).floor().long()
    step = torch.pow(2, (octave - 3).clamp(min=0))
    return torch.where(lengths <= _SHORTEST_PAD, _SHORTEST_PAD, (lengths + step - 1) // step * step)


def causal_segments(keys: torch.Tensor) -> Segments:
    """Segments of a batch from per-token keys [B, T] (integers; equal key in a row: same
    segment). Causality follows the order of the tokens in the row, as with a causal mask
    restricted to equal keys; a key that reappears later in its row (positions that restart
    without a new doc_id) joins the same segment. Runs on the host: one device sync."""
    B, T = keys.shape
    device = keys.device
    k = keys.detach().to("cpu", torch.int64)
    k = k - k.amin()
    flat = (torch.arange(B)[:, None] * (k.amax() + 1) + k).flatten()
    n = flat.numel()
    starts = torch.cat([torch.zeros(1, dtype=torch.long), (flat[1:] != flat[:-1]).nonzero().flatten() + 1])
    order = None
    if torch.unique(flat[starts]).numel() != starts.numel():
        # Some key returns after another: sort stably so each key's tokens become one run in row order.
        order = torch.argsort(flat, stable=True)
        s = flat[order]
        starts = torch.cat([torch.zeros(1, dtype=torch.long), (s[1:] != s[:-1]).nonzero().flatten() + 1])
    lengths = torch.diff(starts, append=torch.tensor([n]))
    if starts.numel() == B and order is None:
        return Segments((), torch.empty(0, dtype=torch.long, device=device), True, lengths)

    padded = padded_lengths(lengths)
    slot = torch.empty(n, dtype=torch.long)  # per token (in run order): its row in the concatenated outputs
    groups, offset = [], 0
    for size in torch.unique(padded).tolist():
        chosen = (padded == size).nonzero().flatten()
        first, length = starts[chosen], lengths[chosen]
        L = int(length.max())  # pad to the longest member, not to the ladder step
        step = torch.arange(L)
        run_pos = first[:, None] + torch.minimum(step, length[:, None] - 1)  # [n_seg, L]
        real = step < length[:, None]
        slot[run_pos[real]] = offset + torch.arange(run_pos.numel()).view_as(run_pos)[real]
        groups.append((run_pos if order is None else order[run_pos]).to(device))
        offset += run_pos.numel()
    if order is not None:
        slot = torch.empty_like(slot).index_copy_(0, order, slot)
    return Segments(tuple(groups), slot.to(device), False, lengths)


@torch.compiler.disable  # data-dependent shapes: run eagerly inside a compiled block
def segment_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: Segments) -> torch.Tensor:
    """Causal attention within segments. q [B, T, H, D], k/v [B, T, Hkv, D] -> [B, T, H, D].
    Exact: equal to SDPA with the mask (causal & same segment), forward and backward."""
    if segments.whole_rows:
        return causal_attention(q, k, v)
    B, T = q.shape[:2]
    qf, kf, vf = q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1)
    outs = [causal_attention(qf[index], kf[index], vf[index]).flatten(0, 1) for index in segments.groups]
    out = outs[0] if len(outs) == 1 else torch.cat(outs)
    return out[segments.source].unflatten(0, (B, T))


# ---------------------------------------------------------------- one batch's plan


class AttentionLayout:
    """How each kind of layer attends for one batch, decided once per forward and shared by
    every layer: `global_segments` for NoPE layers, `chunked_segments` for RoPE layers, None
    meaning plain causal attention over the row, and `chunks_by_reshape` when the chunks tile
    unpacked rows exactly."""

    def __init__(
        self,
        batch_size: int,
        seq_len: int,
        chunk_size: int | None,
        positions: torch.Tensor | None,
        doc_ids: torch.Tensor | None,
        device: torch.device,
    ):
        self.chunk_size = chunk_size
        self.chunks_by_reshape = False
        self.global_segments = None if doc_ids is None else causal_segments(document_keys(doc_ids))
        if chunk_size is None:
            self.chunked_segments = self.global_segments
        elif positions is None and doc_ids is None and seq_len <= chunk_size:
            self.chunked_segments = None
        elif positions is None and doc_ids is None and seq_len % chunk_size == 0:
            self.chunks_by_reshape = True
            self.chunked_segments = None
        else:
            if positions is None:
                positions = torch.arange(seq_len, device=device)
            positions = positions.expand(batch_size, seq_len)
            self.chunked_segments = causal_segments(chunk_keys(positions, doc_ids, chunk_size))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunked: bool) -> torch.Tensor:
        """q [B, T, H, D], k/v [B, T, Hkv, D] -> [B, T, H, D] for a chunked (RoPE) or global
        (NoPE) layer."""
        if chunked and self.chunks_by_reshape:
            return chunked_by_reshape(q, k, v, self.chunk_size)
        segments = self.chunked_segments if chunked else self.global_segments
        if segments is None:
            return causal_attention(q, k, v)
        return segment_attention(q, k, v, segments)
