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

from .distill import distillation_sums


@dataclass
class LossOutput:
    loss: torch.Tensor  # what backward() runs on
    ce_sum: torch.Tensor  # cross-entropy summed over this micro-batch's targets (detached, fp32)
    router: torch.Tensor  # [aux, z]: router losses, mean over MoE layers (detached, fp32)
    expert_counts: torch.Tensor  # [n_moe_layers, n_experts] tokens per expert (long, CPU)
    routed_slots: int  # tokens x top_k: what a dropless layer computes
    by_position: torch.Tensor | None = None  # [2, n_buckets]: CE sum and target count per position bucket
    soft_sum: torch.Tensor | None = None  # distillation: tau^2 x KL to the teacher, summed over the targets


def count_targets(batches: list[dict]) -> torch.Tensor:
    """Target tokens (labels != -100) in these micro-batches, as a float tensor to all-reduce."""
    return torch.tensor(float(sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in batches)))


def model_inputs(batch: dict, device: torch.device, args: ModelArgs) -> dict:
    """The model's keyword arguments for a batch, on the device. A model with a vision encoder
    always gets `images` (an empty [0, 3, H, W] when the batch has none), so that every rank runs
    the encoder every step and FSDP's collectives and the optimizer state stay uniform."""
    inputs = {k: batch[k].to(device) for k in ("tokens", "positions", "doc_ids", "image_rows") if k in batch}
    if "layout" in batch:  # context parallelism: the rank's part of each row attends through it
        inputs["layout"] = batch["layout"]
    if args.vision.enabled:
        size = args.vision.image_size
        inputs["images"] = batch.get("images", torch.empty(0, 3, size, size)).to(device)
    return inputs


@dataclass
class DistillStep:
    """What a distillation micro-batch needs: the teacher (train/teacher.py) and this step's
    temperature, soft-target weight and token chunk."""

    teacher: object
    temperature: float
    weight: float
    chunk_size: int


def compute_loss(model, batch: dict, args: ModelArgs, *, global_targets: torch.Tensor | float, world_size: int = 1,
                 grad_accum: int = 1, autocast_dtype: torch.dtype | None = None,
                 position_buckets: list[int] | None = None, distill: DistillStep | None = None) -> LossOutput:
    """Forward one micro-batch and return its loss, normalised as the module docstring says.
    With `position_buckets` (ascending bucket edges), also the cross-entropy summed per bucket of
    the target's position in its document: what a long-context phase should improve. With
    `distill`, the loss is train/distill.py's (hard CE and the teacher's soft targets, made
    chunk by chunk from the hidden states); its hard part is reported as the CE."""
    device = next(model.parameters()).device
    labels = batch["labels"].to(device)
    autocast = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
                else contextlib.nullcontext())
    soft = by_position = None
    if distill is not None:
        targets = distill.teacher.targets(batch, device, autocast_dtype)

        def output_fn(hidden, head):
            return distillation_sums(hidden.flatten(0, 1), head, labels.flatten(), targets,
                                     temperature=distill.temperature, weight=distill.weight,
                                     chunk_size=distill.chunk_size)

        with autocast:
            sums, router, counts = model(**model_inputs(batch, device, args), return_router_stats=True,
                                         output_fn=output_fn)
        summed, ce, soft = sums.loss, sums.hard.float(), sums.soft.float()
    else:
        with autocast:
            logits, router, counts = model(**model_inputs(batch, device, args), return_router_stats=True)
        per_token = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                                    reduction="none")
        summed = ce = per_token.sum()
        if position_buckets:
            by_position = _by_position(per_token.detach(), labels, batch.get("positions"), position_buckets)
    router = router.float()
    loss = (summed * world_size / global_targets
            + (args.aux_loss_weight * router[0] + args.router_z_loss_coef * router[1]) / grad_accum)
    return LossOutput(loss, ce.detach(), router.detach(), counts.cpu(), labels.numel() * args.top_k, by_position,
                      None if soft is None else soft.detach())


def _by_position(per_token: torch.Tensor, labels: torch.Tensor, positions, edges: list[int]) -> torch.Tensor:
    """[2, len(edges) + 1] float64 on the CPU: CE sum and target count per bucket of positions."""
    B, T = labels.shape
    if positions is None:
        positions = torch.arange(T, device=labels.device).expand(B, T)
    bucket = torch.bucketize(positions.to(labels.device).contiguous(), torch.tensor(edges, device=labels.device),
                             right=True)
    valid = (labels != IGNORE_INDEX).flatten()
    bucket = bucket.flatten()[valid]
    n = len(edges) + 1
    sums = torch.zeros(n, dtype=torch.float64, device=labels.device).index_add_(0, bucket, per_token[valid].double())
    counts = torch.bincount(bucket, minlength=n).double()
    return torch.stack((sums, counts)).cpu()


def bucket_names(edges: list[int]) -> list[str]:
    """loss/pos_0-1K, loss/pos_1K-8K, ..., loss/pos_128K+ for edges [1024, 8192, ..., 131072]."""
    def short(n: int) -> str:
        return f"{n // 1024}K" if n % 1024 == 0 and n else str(n)

    bounds = [0, *edges]
    return [f"loss/pos_{short(lo)}-{short(hi)}" for lo, hi in zip(bounds, edges)] + [f"loss/pos_{short(edges[-1])}+"]
