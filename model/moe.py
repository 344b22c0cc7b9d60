"""Mixture of experts, Llama 4 style: a sigmoid top-k router that scales each routed
expert's *input*, token-sparse routed experts, and a shared expert that sees every token.

The MoE layer never talks to other processes itself. It hands the tokens it routed, already
sorted by expert, to a `TokenDispatcher`; the local one keeps them here, and parallel/ installs
an all-to-all one for expert parallelism. The experts module computes whatever experts live
on this rank, one group of rows per expert.

With `load_balance="aux_free"` (DeepSeek-V3) a per-expert bias, kept in a buffer and moved by
the trainer after each optimizer step, is added to the router logits for choosing experts
only; the chosen experts' scores remain the sigmoid of the raw logits.
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
    counts, starts moving them and returns a handle; `receive(handle)` returns (tokens grouped
    by local expert, counts per local expert) once they have arrived. The MoE layer computes
    the shared expert between the two, so that work overlaps the transfer. `combine(out,
    handle)` returns the expert outputs in the original sorted order.
    """

    def dispatch(self, tokens: torch.Tensor, counts: torch.Tensor) -> Any:
        return tokens, counts

    def receive(self, handle: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return handle

    def combine(self, out: torch.Tensor, handle: Any) -> torch.Tensor:
        return out


LocalDispatcher = TokenDispatcher  # all experts on this rank: dispatch and combine are identities


def _grouped_mm_supported(x: torch.Tensor) -> bool:
    if not hasattr(torch, "_grouped_mm"):
        return False
    if x.device.type == "cpu":
        # Eager CPU kernels take fp32; the compiler's shape rules for the op accept bf16 only.
        if torch.compiler.is_compiling():
            return x.dtype == torch.bfloat16
        return x.dtype in (torch.float32, torch.bfloat16)
    if x.device.type == "cuda":
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device)[0] >= 9
    return False


class GroupedExperts(nn.Module):
    """Routed experts stored stacked: w1/w3 [E, dim, hidden], w2 [E, hidden, dim].

    `forward(x, counts)` takes rows grouped by expert (counts[e] rows for expert e, in order)
    and applies each expert's SwiGLU to its rows only, with three grouped matmuls.
    `self.grouped_mm` is `grouped_mm` below; parallel/ may replace it with one that has the same
    contract but another number format (FP8), which leaves the parameters and their names alone."""

    def __init__(self, n_experts: int, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(n_experts, dim, hidden))
        self.w3 = nn.Parameter(torch.empty(n_experts, dim, hidden))
        self.w2 = nn.Parameter(torch.empty(n_experts, hidden, dim))
        self.grouped_mm = grouped_mm

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        w1, w2, w3 = (_local(w).to(x.dtype) for w in (self.w1, self.w2, self.w3))
        if x.shape[0] == 0:
            # With expert parallelism a rank can receive no tokens at all. Its experts must still
            # get a (zero) gradient, so that gradient reduction and the grad-norm collectives
            # run the same way on every rank; the empty SwiGLU gives exactly that.
            return (F.silu(x @ w1[0]) * (x @ w3[0])) @ w2[0]
        mm = self.grouped_mm
        h = F.silu(mm(x, w1, counts)) * mm(x, w3, counts)
        return mm(h, w2, counts)


def grouped_mm(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """x [M, K] with rows grouped by expert (counts[e] rows for expert e), w [E, K, N] -> [M, N]:
    each group of rows times its expert's matrix. One grouped matmul when the backend has it,
    otherwise one matmul per expert."""
    if _grouped_mm_supported(x):
        offs = torch.cumsum(counts, 0, dtype=torch.int32)
        return torch._grouped_mm(x.contiguous(), w, offs=offs)
    return torch.cat([rows @ w[e] for e, rows in enumerate(torch.split(x, counts.tolist()))])


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
        # Aux-loss-free balancing: a bias on the logits used only to choose experts. A
        # persistent buffer, so checkpoints carry it; None (and absent from the state dict)
        # otherwise, which keeps the Hugging Face names one-to-one.
        bias = torch.zeros(args.n_experts) if args.load_balance == "aux_free" else None
        self.register_buffer("expert_bias", bias, persistent=True)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Router logits [N, E], chosen experts [N, k] (top-k of the logits, plus the balancing
        bias when there is one) and their sigmoid scores [N, k] (of the raw logits)."""
        logits = self.router(x)
        if self.expert_bias is None:
            top_logits, experts = torch.topk(logits, self.top_k, dim=-1)
        else:
            experts = torch.topk(logits.float() + self.expert_bias, self.top_k, dim=-1).indices
            top_logits = logits.gather(-1, experts)
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
        # Tokens per expert, with a shape that does not depend on the data (the planner's fake
        # tensors and the compiler need that; bincount's does).
        counts = torch.zeros(self.n_experts, dtype=torch.long, device=x.device).index_add_(
            0, flat_experts, torch.ones_like(flat_experts))
        routed = x[token_of] * scores.flatten()[order, None]

        handle = self.dispatcher.dispatch(routed, counts)
        shared = self.shared_expert(x) if self.shared_expert is not None else None  # overlaps the dispatch
        routed, local_counts = self.dispatcher.receive(handle)
        routed = self.experts(routed, local_counts)
        routed = self.dispatcher.combine(routed, handle)

        out = torch.zeros_like(x).index_add_(0, token_of, routed.to(x.dtype))
        if shared is not None:
            out = out + shared
        return out.view(shape), self.router_losses(logits, counts), counts.detach()

    def router_losses(self, logits: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """[switch load-balancing loss, router z-loss], both unweighted."""
        logits = logits.float()
        fraction = counts.float() / counts.sum().clamp(min=1)  # share of routed slots per expert
        prob = F.softmax(logits, dim=-1).mean(0)
        aux = self.n_experts * (fraction * prob).sum()
        z = torch.logsumexp(logits, dim=-1).pow(2).mean()
        return torch.stack((aux, z))
