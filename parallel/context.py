"""Context parallelism for iRoPE: the `cp` ranks of a group share every row of the batch, each
holding 1/cp of its tokens, and exchange only the keys and values their queries need.

1. **Sharding, balanced.** A row of T tokens is cut into 2 x cp equal pieces; rank r holds
   pieces r and 2cp - 1 - r (head-tail order), so every rank has an early and a late piece and
   the causal work is even. Tokens, labels, positions and doc ids are permuted alike
   (`head_tail_order`, `shard_batch`); every rank knows the whole row's positions and doc ids,
   so each can plan every rank's exchange without communicating.
2. **Exchange, exact and sparse.** A query attends to the earlier tokens of its segment: its
   (document, chunk) on RoPE layers, its document on NoPE layers (model/attention.py). A rank
   receives, per layer kind, exactly the earlier tokens of the segments its queries are in
   that other ranks hold: on chunked layers a halo of fewer than `attention_chunk_size` tokens
   before each piece (none when a piece starts a chunk or a document); on global layers the
   documents that overlap its pieces — Llama 3's all-gather of K/V when one document spans
   the row, and much less with packed short documents. One variable-size all-to-all of K and
   V per layer (`_ExchangeRows`), mirrored in backward.
3. **Attention, without a T x T mask.** The received and local tokens of a segment form a
   causal sequence in which the local queries are runs; each run attends to the segment's
   tokens up to its end: causal attention aligned to the lower right (query i sees keys
   j <= i + K - Q). Runs are batched by key length like `Segments`. On CUDA, SDPA with
   `causal_lower_right` (flash attention, no mask); on CPU, whose fused kernel aligns causal
   masks top-left, the queries are padded in front to the key length and plain causal SDPA
   runs (the padded rows are dropped: exact, memory O(T), more compute on global layers).

Everything else in the model is per token (embeddings, norms, MoE, the loss), so the rest of
the step is unchanged: the loss is each rank's CE over its targets divided by the global target
count, and FSDP (which shards over all ranks, cp included) sums the gradients.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from model import ModelArgs
from model.attention import chunk_keys, document_keys, padded_lengths, suffix_causal_attention

from .expert import _all_to_all_start, _wait


def head_tail_order(seq_len: int, cp: int) -> torch.Tensor:
    """[cp, seq_len // cp]: the row indices each rank holds, pieces r and 2cp - 1 - r."""
    if cp < 1 or seq_len % (2 * cp):
        raise ValueError(f"seq_len {seq_len} must be a multiple of 2 x parallel.cp = {2 * cp} for context "
                         "parallelism (each rank holds two equal pieces of every row); change train.seq_len "
                         "(or the phase's seq_len) or parallel.cp")
    pieces = torch.arange(seq_len).view(2 * cp, seq_len // (2 * cp))
    return torch.stack([torch.cat((pieces[r], pieces[2 * cp - 1 - r])) for r in range(cp)])


# ---------------------------------------------------------------- the plan of one layer kind


@dataclass(frozen=True)
class ExchangePlan:
    """What one rank sends, receives and attends over for one layer kind.

    send_index: [n_send] into the rank's flattened local tokens (B * T_local), grouped by
        destination rank; send_splits / recv_splits: rows to / from each rank of the group.
    groups: per batch of query runs, (query_index [G, Q] into the local tokens, key_index
        [G, K] into the local tokens followed by the received ones).
    source: [B * T_local], each local token's row in the concatenated outputs of the groups.
    exchange: whether any rank of the group sends anything for this layer kind."""

    send_index: torch.Tensor
    send_splits: list[int]
    recv_splits: list[int]
    groups: tuple[tuple[torch.Tensor, torch.Tensor], ...]
    source: torch.Tensor
    exchange: bool
    lower_right: bool


def plan_exchange(keys: torch.Tensor, order: torch.Tensor, rank: int, lower_right: bool,
                  device: torch.device) -> ExchangePlan:
    """The plan for segment keys [B, T] of whole rows (equal key in a row: same segment, causal in
    row order), tokens held as `order` [cp, T_local] says, seen from `rank`. Host work."""
    B, T = keys.shape
    cp, n_local = order.shape
    owner = torch.empty(T, dtype=torch.long)
    owner[order.flatten()] = torch.arange(cp).repeat_interleave(n_local)
    local_pos = torch.empty(T, dtype=torch.long)
    local_pos[order.flatten()] = torch.arange(n_local).repeat(cp)

    k = keys.detach().to("cpu", torch.int64)
    k = k - k.amin()
    seg = torch.unique((torch.arange(B)[:, None] * (k.amax() + 1) + k).flatten(), return_inverse=True)[1]
    t_of = torch.arange(T).repeat(B)  # [B * T] row index of each token
    b_of = torch.arange(B).repeat_interleave(T)
    own = owner.repeat(B)
    # need[d]: tokens rank d does not hold but must receive: earlier than d's last token in their segment.
    need = torch.zeros(cp, B * T, dtype=torch.bool)
    for d in range(cp):
        last = torch.full((int(seg.max()) + 1,), -1, dtype=torch.long)
        held = own == d
        last.scatter_reduce_(0, seg[held], t_of[held], reduce="amax")
        need[d] = ~held & (t_of < last[seg])

    mine = own == rank
    to_local = b_of * n_local + local_pos[t_of]  # a token's index in its owner's flattened local tokens
    send = [to_local[(mine & need[d]).nonzero().flatten()] for d in range(cp)]
    recv = [((own == r) & need[rank]).nonzero().flatten() for r in range(cp)]
    send_index = torch.cat(send)

    # The rank's tokens (local first, in local order, then the received ones), sorted by
    # (segment, row index): each segment becomes a run of the causal order it attends in.
    local_full = (torch.arange(B)[:, None] * T + order[rank]).flatten()
    held_full = torch.cat((local_full, *recv))
    is_query = torch.arange(held_full.numel()) < local_full.numel()
    by_segment = torch.argsort(seg[held_full] * T + t_of[held_full])
    s_seg, s_query = seg[held_full][by_segment], is_query[by_segment]
    n = by_segment.numel()
    index = torch.arange(n)
    new_seg = torch.ones(n, dtype=torch.bool)
    new_seg[1:] = s_seg[1:] != s_seg[:-1]
    seg_start = torch.cummax(torch.where(new_seg, index, 0), 0).values
    prev_query = torch.zeros(n, dtype=torch.bool)
    prev_query[1:] = s_query[:-1]
    next_continues = torch.zeros(n, dtype=torch.bool)
    next_continues[:-1] = s_query[1:] & ~new_seg[1:]
    run_start = (s_query & (new_seg | ~prev_query)).nonzero().flatten()
    run_end = (s_query & ~next_continues).nonzero().flatten() + 1
    first_key = seg_start[run_start]
    q_len, kv_len = run_end - run_start, run_end - first_key

    groups, offset = [], 0
    slot = torch.empty(local_full.numel(), dtype=torch.long)
    padded = padded_lengths(kv_len)
    for size in torch.unique(padded).tolist():
        chosen = (padded == size).nonzero().flatten()
        q, kv, start, first = q_len[chosen], kv_len[chosen], run_start[chosen], first_key[chosen]
        K = int(kv.max())
        Q = int((q + K - kv).max()) if lower_right else K
        kv_rows = first[:, None] + torch.minimum(torch.arange(K), kv[:, None] - 1)
        # Real queries sit where lower-right alignment puts them: front padding Q - q - (K - kv),
        # end padding K - kv (the padded keys at the end are seen only by padded queries).
        front = Q - q - (K - kv)
        step = torch.arange(Q)[None, :] - front[:, None]
        q_rows = start[:, None] + step.clamp(min=0).minimum(q[:, None] - 1)
        real = (step >= 0) & (step < q[:, None])
        query_index = by_segment[q_rows]  # local tokens come first, so these index the local tokens
        slot[query_index[real]] = offset + torch.arange(Q * len(chosen)).view(len(chosen), Q)[real]
        groups.append((query_index.to(device), by_segment[kv_rows].to(device)))
        offset += Q * len(chosen)
    return ExchangePlan(send_index.to(device), [len(s) for s in send], [len(r) for r in recv], tuple(groups),
                        slot.to(device), bool(need.any()), lower_right)


# ---------------------------------------------------------------- the exchange


class _ExchangeRows(torch.autograd.Function):
    """A variable-size all-to-all of rows; backward sends the gradients back the same way."""

    @staticmethod
    def forward(ctx, rows, send: list[int], recv: list[int], group: str):
        ctx.route = (send, recv, group)
        return _wait(_all_to_all_start(rows, recv, send, group))

    @staticmethod
    def backward(ctx, grad):
        send, recv, group = ctx.route
        return _wait(_all_to_all_start(grad, send, recv, group)), None, None, None


def exchange_rows(rows: torch.Tensor, plan: ExchangePlan, group: str) -> torch.Tensor:
    if not plan.exchange:
        return rows[:0]
    shape = rows.shape[1:]
    out = _ExchangeRows.apply(rows.flatten(1), plan.send_splits, plan.recv_splits, group)
    return out.unflatten(1, shape)


class ContextParallelLayout:
    """The attention layout of one context-parallel batch, seen from one rank: what
    `Transformer.forward(layout=...)` calls instead of building `AttentionLayout`."""

    def __init__(self, positions: torch.Tensor, doc_ids: torch.Tensor | None, chunk_size: int | None,
                 order: torch.Tensor, rank: int, group: str, device: torch.device, lower_right: bool | None = None):
        """positions, doc_ids: [B, T] of the whole rows; order: `head_tail_order`."""
        if lower_right is None:
            lower_right = device.type == "cuda"
        doc = doc_ids if doc_ids is not None else torch.zeros_like(positions)
        self.group = group
        self.global_plan = plan_exchange(document_keys(doc), order, rank, lower_right, device)
        self.chunked_plan = (self.global_plan if chunk_size is None else
                             plan_exchange(chunk_keys(positions, doc_ids, chunk_size), order, rank, lower_right,
                                           device))

    @torch.compiler.disable  # data-dependent shapes and a collective: eager inside a compiled block
    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunked: bool) -> torch.Tensor:
        """q [B, T_local, H, D], k/v [B, T_local, Hkv, D] -> [B, T_local, H, D]."""
        plan = self.chunked_plan if chunked else self.global_plan
        B, n = q.shape[:2]
        qf = q.flatten(0, 1)
        kv = torch.stack((k.flatten(0, 1), v.flatten(0, 1)), 1)  # [B * T_local, 2, Hkv, D]
        kv = torch.cat((kv, exchange_rows(kv[plan.send_index], plan, self.group)))
        outs = []
        for query_index, key_index in plan.groups:
            kvg = kv[key_index]
            outs.append(suffix_causal_attention(qf[query_index], kvg[:, :, 0], kvg[:, :, 1],
                                                plan.lower_right).flatten(0, 1))
        out = outs[0] if len(outs) == 1 else torch.cat(outs)
        return out[plan.source].unflatten(0, (B, n))


# ---------------------------------------------------------------- the batch


@dataclass(frozen=True)
class ContextParallel:
    """This rank's place in its context-parallel group: `size` ranks share each row."""

    size: int
    rank: int
    group: str  # the process group's name, for the functional collectives

    @classmethod
    def from_mesh(cls, mesh: DeviceMesh) -> ContextParallel:
        group = mesh.get_group()
        return cls(mesh.size(), dist.get_rank(group), group.group_name)


def shard_batch(batch: dict, cp: ContextParallel, args: ModelArgs, device: torch.device,
                lower_right: bool | None = None) -> dict:
    """This rank's part of a batch of whole rows: tokens, labels, positions and doc ids of its two
    pieces, the rows of the image features its <|patch|> slots take (`image_rows`; every rank
    encodes all of the batch's tiles) and the attention `layout`. Other keys pass through."""
    tokens = batch["tokens"]
    B, T = tokens.shape
    order = head_tail_order(T, cp.size)
    mine = order[cp.rank]
    positions = batch.get("positions")
    if positions is None:
        positions = torch.arange(T).expand(B, T)
    doc_ids = batch.get("doc_ids")
    out = dict(batch)
    # Every per-token tensor [B, T, ...] is cut alike (cached teacher targets included).
    for key, value in (("tokens", tokens), ("labels", batch["labels"]), ("positions", positions),
                       ("doc_ids", doc_ids), ("teacher_ids", batch.get("teacher_ids")),
                       ("teacher_probs", batch.get("teacher_probs"))):
        if value is not None:
            out[key] = value[:, mine]
    if args.vision.enabled:
        is_patch = tokens == args.patch_token_id
        ordinal = is_patch.flatten().cumsum(0).view(B, T) - 1  # each slot's row in the batch's features
        out["image_rows"] = ordinal[:, mine][is_patch[:, mine]]
    out["layout"] = ContextParallelLayout(positions, doc_ids, args.attention_chunk_size, order, cp.rank, cp.group,
                                          device, lower_right)
    return out
