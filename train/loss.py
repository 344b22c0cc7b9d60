"""The training loss of one micro-batch, the one formula the loop and the tests share.

The cross-entropy is summed over the micro-batch's targets and divided by the target count of
the *global* batch (all ranks, all micro-batches of the step), times the data-parallel world
size because FSDP averages gradients over ranks. So N ranks or N micro-batches give the same
gradients as one process on the whole batch. Router losses are per-micro-batch means and are
divided by the number of micro-batches.

A new loss term (a distillation teacher's, for one) belongs here: `compute_loss` returns every
term it adds, detached, for the metrics.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from data.tokenizer import IGNORE_INDEX
from model import ModelArgs


@dataclass
class LossOutput:
    loss: torch.Tensor  # what backward() runs on
    ce_sum: torch.Tensor  # cross-entropy summed over this micro-batch's targets (detached, fp32)
    router: torch.Tensor  # [aux, z]: router losses, mean over MoE layers (detached, fp32)
    expert_counts: torch.Tensor  # [n_moe_layers, n_experts] tokens per expert (long, CPU)
    routed_slots: int  # tokens x top_k: what a dropless layer computes


def count_targets(batches: list[dict]) -> torch.Tensor:
    """Target tokens (labels != -100) in these micro-batches, as a float tensor to all-reduce."""
    return torch.tensor(float(sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in batches)))


def model_inputs(batch: dict, device: torch.device, args: ModelArgs) -> dict:
    """The model's keyword arguments for a batch, on the device. A model with a vision encoder
    always gets `images` (an empty [0, 3, H, W] when the batch has none), so that every rank runs
    the encoder every step and FSDP's collectives and the optimizer state stay uniform."""
    inputs = {k: batch[k].to(device) for k in ("tokens", "positions", "doc_ids") if k in batch}
    if args.vision.enabled:
        size = args.vision.image_size
        inputs["images"] = batch.get("images", torch.empty(0, 3, size, size)).to(device)
    return inputs


def compute_loss(model, batch: dict, args: ModelArgs, *, global_targets: torch.Tensor | float, world_size: int = 1,
                 grad_accum: int = 1, autocast_dtype: torch.dtype | None = None) -> LossOutput:
    """Forward one micro-batch and return its loss, normalised as the module docstring says."""
    device = next(model.parameters()).device
    labels = batch["labels"].to(device)
    autocast = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
                else contextlib.nullcontext())
    with autocast:
        logits, router, counts = model(**model_inputs(batch, device, args), return_router_stats=True)
    ce = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    router = router.float()
    loss = (ce * world_size / global_targets
            + (args.aux_loss_weight * router[0] + args.router_z_loss_coef * router[1]) / grad_accum)
    return LossOutput(loss, ce.detach(), router.detach(), counts.cpu(), labels.numel() * args.top_k)
