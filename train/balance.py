"""Expert load outside the loss: the auxiliary-loss-free bias update (DeepSeek-V3) and the
per-layer load metrics written to metrics.jsonl.

Both take the tokens-per-expert table of a whole optimizer step, [n_moe_layers, n_experts],
summed over micro-batches and all data-parallel ranks, so every rank applies the same update.
"""
from __future__ import annotations

import torch
from torch import nn

from model import MoE


def moe_layers(model: nn.Module) -> list[MoE]:
    """The MoE modules in layer order, the order of the model's tokens-per-expert rows."""
    return [m for m in model.modules() if isinstance(m, MoE)]


@torch.no_grad()
def update_expert_bias(layers: list[MoE], counts: torch.Tensor, rate: float) -> None:
    """bias_e += rate * sign(mean load - load_e): an overloaded expert becomes less likely to be
    chosen, an underloaded one more. Only selection sees the bias, never the scores."""
    for moe, layer_counts in zip(layers, counts):
        if moe.expert_bias is None:
            continue
        load = layer_counts.to(moe.expert_bias.device, torch.float32)
        moe.expert_bias.add_(torch.sign(load.mean() - load), alpha=rate)


def expert_metrics(counts: torch.Tensor, layer_ids: list[int], routed_slots: int) -> dict:
    """Per MoE layer: max/mean load (1 = balanced; 0 for a layer that saw no tokens), busiest and
    idlest expert's tokens. `dropped` is routed slots (tokens x top_k) minus the slots experts
    computed: 0 for a dropless layer."""
    counts = counts.double().cpu()
    row: dict = {}
    for i, c in zip(layer_ids, counts):
        mean = c.mean().item()
        row[f"moe/layer{i}/imbalance"] = c.max().item() / mean if mean > 0 else 0.0
        row[f"moe/layer{i}/tokens_max"] = int(c.max().item())
        row[f"moe/layer{i}/tokens_min"] = int(c.min().item())
        row[f"moe/layer{i}/dropped"] = int(routed_slots - c.sum().item())
    return row
