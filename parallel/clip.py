"""Gradient clipping over parameters that live on different device meshes.

torch.nn.utils.clip_grad_norm_ cannot mix DTensors from different meshes in one norm, and with
expert parallelism a model has two: dense weights FSDP-sharded over dp_shard, routed experts
sharded over dp_shard_mod_ep x ep. The norm is therefore computed per mesh (each reduced over
its own ranks), the per-mesh norms are combined, and every gradient is scaled by the one
resulting coefficient.
"""
from __future__ import annotations

import math
from collections.abc import Iterable

import torch


@torch.no_grad()
def clip_grad_norm_(parameters: Iterable[torch.Tensor], max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
    """Clip in place to a total `norm_type` norm of `max_norm`; returns the total norm before
    clipping as a plain tensor, the same on every rank."""
    groups: dict[object, list[torch.Tensor]] = {}
    for p in parameters:
        if p.grad is not None:
            groups.setdefault(getattr(p.grad, "device_mesh", None), []).append(p)
    # Meshes come in the order parameters do, the same on every rank, so the reductions inside
    # full_tensor() pair up across ranks.
    ordered = list(groups.items())
    norms = []
    for _, params in ordered:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params], norm_type)
        norms.append(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    if not norms:
        return torch.tensor(0.0)
    stacked = torch.stack([n.float() for n in norms])
    total = stacked.max() if math.isinf(norm_type) else stacked.pow(norm_type).sum().pow(1.0 / norm_type)
    for _, params in ordered:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total
