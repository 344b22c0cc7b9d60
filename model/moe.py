"""Mixture of experts, Llama 4 style: a sigmoid top-k router that scales each routed
expert's *input*, token-sparse routed experts, and a shared expert that sees every token.

The MoE layer never talks to other processes itself. It hands the tokens it routed, already
sorted by expert, to a `TokenDispatcher`; the local one keeps them here, and parallel/ installs
an all-to-all one for expert parallelism. The experts module computes whatever experts live
on this rank, one group of rows per expert.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .args import ModelArgs
from .layers import FeedForward


class TokenDispatcher:
    """Moves routed tokens to the experts that own them and the results back.

    `dispatch(tokens, counts)` takes tokens sorted by global expert id with their per-expert
    counts and returns (tokens grouped by local expert, counts per local expert, handle);
    `combine(out, handle)` returns the expert outputs in the original sorted order.
    """

    n_local_experts: int | None = None  # None: all experts are local

    def dispatch(self, tokens: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Any]:
        return tokens, counts, None

    def combine(self, out: torch.Tensor, handle: Any) -> torch.Tensor:
        return out


LocalDispatcher = TokenDispatcher  # all experts on this rank: dispatch and combine are identities


def _grouped_mm_supported(x: torch.Tensor) -> bool:
    if not hasattr(torch, "_grouped_mm"):
        return False
    if x.device.type == "cpu":
        return x.dtype in (torch.float32, torch.bfloat16)
    if x.device.type == "cuda":
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device)[0] >= 9
    return False


class GroupedExperts(nn.Module):
    """Routed experts stored stacked: w1/w3 [E, dim, hidden], w2 [E, hidden, dim].

    `forward(x, counts)` takes rows grouped by expert (counts[e] rows for expert e, in order)
    and applies each expert's SwiGLU to its rows only: one grouped matmul per weight when the
    backend has it, otherwise one matmul per expert that received tokens."""

    def __init__(self, n_experts: int, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(n_experts, dim, hidden))
        self.w3 = nn.Parameter(torch.empty(n_experts, dim, hidden))
        self.w2 = nn.Parameter(torch.empty(n_experts, hidden, dim))

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        w1, w2, w3 = (_local(w).to(x.dtype) for w in (self.w1, self.w2, self.w3))
        if _grouped_mm_supported(x):
            offs = torch.cumsum(counts, 0, dtype=torch.int32)
            x = x.contiguous()
            h = F.silu(torch._grouped_mm(x, w1, offs=offs)) * torch._grouped_mm(x, w3, offs=offs)
            return torch._grouped_mm(h, w2, offs=offs)
        outs = []
        for e, rows in enumerate(torch.split(x, counts.tolist())):
            if rows.shape[0]:
                outs.append(F.silu(rows @ w1[e]) * (rows @ w3[e]) @ w2[e])
        return torch.cat(outs) if outs else x.new_zeros(0, w2.shape[-1])


def _local(w: torch.Tensor) -> torch.Tensor:
    # Expert weights sharded by parallel/ are DTensors whose local shard is this rank's experts.
    return w.to_local() if hasattr(w, "to_local") else w


class MoE(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_experts, self.top_k = args.n_experts, args.top_k
        self.router = nn.Linear(args.dim, args.n_experts, bias=False)
        self.experts = GroupedExperts(args.n_experts, args.dim, args.expert_hidden)
        self.shared_expert = FeedForward(args.dim, args.expert_hidden) if args.shared_expert else None
        self.dispatcher: TokenDispatcher = LocalDispatcher()

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Router logits [N, E], chosen experts [N, k] (top-k of the logits) and their
        sigmoid scores [N, k]."""
        logits = self.router(x)
        top_logits, experts = torch.topk(logits, self.top_k, dim=-1)
        scores = torch.sigmoid(top_logits.float()).to(x.dtype)
        return logits, experts, scores

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (output like x, router losses [aux, z] unweighted, tokens per expert [E])."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        logits, experts, scores = self.route(x)

        flat_experts = experts.flatten()
        order = torch.argsort(flat_experts, stable=True)
        token_of = torch.div(order, self.top_k, rounding_mode="floor")
        counts = torch.bincount(flat_experts, minlength=self.n_experts)
        routed = x[token_of] * scores.flatten()[order, None]

        routed, local_counts, handle = self.dispatcher.dispatch(routed, counts)
        routed = self.experts(routed, local_counts)
        routed = self.dispatcher.combine(routed, handle)

        out = torch.zeros_like(x).index_add_(0, token_of, routed.to(x.dtype))
        if self.shared_expert is not None:
            out = out + self.shared_expert(x)
        return out.view(shape), self.router_losses(logits, counts), counts.detach()

    def router_losses(self, logits: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """[switch load-balancing loss, router z-loss], both unweighted."""
        logits = logits.float()
        fraction = counts.float() / counts.sum().clamp(min=1)  # share of routed slots per expert
        prob = F.softmax(logits, dim=-1).mean(0)
        aux = self.n_experts * (fraction * prob).sum()
        z = torch.logsumexp(logits, dim=-1).pow(2).mean()
        return torch.stack((aux, z))
