"""The online teacher of a distillation run (`distill.teacher=PATH`): a herd checkpoint (a
step directory, or a run directory whose newest checkpoint is taken) or a Hugging Face Llama 4
folder, built and sharded like the student (FSDP, and EP with the same meshes), frozen: eval
mode, no gradients, no optimizer state. It runs under no_grad on the student's tokens,
positions, document ids and images and hands the loss its final hidden states and output head
(train/distill.py), so its logits are made chunk by chunk too.

The output head is gathered whole once (in the FSDP compute dtype) and kept: the loss calls it
during the student's backward, when the teacher's own FSDP state is not active.
"""
from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F

from model import ModelArgs, Transformer
from parallel import Distributed, Meshes, parallelize_model

from .checkpoint import latest_checkpoint, load_checkpoint, model_args_of_checkpoint
from .distill import TeacherTargets
from .loss import model_inputs

log = logging.getLogger("herd")


def teacher_args(path: str) -> tuple[ModelArgs, str]:
    """(ModelArgs, kind) of a teacher path: kind "hf" for a folder with config.json, else "herd"
    (a checkpoint directory, or a run directory: its newest checkpoint)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"distill.teacher={path!r} does not exist")
    if os.path.isfile(os.path.join(path, "config.json")):
        import json

        from model.hf import args_from_hf_config

        with open(os.path.join(path, "config.json")) as f:
            return args_from_hf_config(json.load(f)), "hf"
    return model_args_of_checkpoint(resolve_checkpoint(path)), "herd"


def resolve_checkpoint(path: str) -> str:
    if os.path.isdir(os.path.join(path, "checkpoints")):
        newest = latest_checkpoint(path)
        if newest is None:
            raise FileNotFoundError(f"distill.teacher={path!r} is a run directory without checkpoints")
        return newest
    return path


class Teacher:
    def __init__(self, path: str, student: ModelArgs, parallel, env: Distributed, meshes: Meshes | None):
        args, kind = teacher_args(path)
        if args.vocab_size != student.vocab_size:
            raise ValueError(f"distill.teacher={path!r} has vocab_size {args.vocab_size} but the student has "
                             f"{student.vocab_size}: distillation compares distributions over the same tokens")
        if student.vision.enabled and not args.vision.enabled:
            raise ValueError(f"distill.teacher={path!r} has no vision encoder but the student trains on images; "
                             "use a multimodal teacher or model.vision.enabled=false")
        self.args = args
        if kind == "hf":
            from model.hf import from_hf

            model = from_hf(path)
        else:  # sharded first, then each rank's shards are filled from the checkpoint
            with torch.device("meta"):
                model = Transformer(args)
        model = parallelize_model(model, meshes, param_dtype=parallel.param_dtype, reduce_dtype=parallel.reduce_dtype,
                                  device_type=env.device.type)
        if kind == "hf":
            model.to(env.device)
        else:
            model.to_empty(device=env.device)
            load_checkpoint(resolve_checkpoint(path), model)
        model.eval()
        model.requires_grad_(False)
        self.model = model
        weight = model.output.weight
        full = weight.full_tensor() if hasattr(weight, "full_tensor") else weight
        self.head_weight = full.detach().clone()
        self.multiplier = args.logit_multiplier
        if env.is_main:
            n = sum(p.numel() for p in model.parameters()) / 1e6
            log.info(f"teacher: {path} ({kind}, {n:,.1f}M parameters on this rank), frozen")

    def head(self, h: torch.Tensor) -> torch.Tensor:
        logits = F.linear(h.to(self.head_weight.dtype), self.head_weight)
        return logits * self.multiplier if self.multiplier != 1.0 else logits

    @torch.no_grad()
    def targets(self, batch: dict, device: torch.device, autocast_dtype: torch.dtype | None) -> TeacherTargets:
        """The teacher's hidden states on this micro-batch, flattened to [B * T, dim]."""
        inputs = model_inputs(batch, device, self.args)
        autocast = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None else None
        if autocast is not None:
            with autocast:
                hidden = self.model(**inputs, output_fn=lambda h, head: h)
        else:
            hidden = self.model(**inputs, output_fn=lambda h, head: h)
        return TeacherTargets("logits", hidden=hidden.flatten(0, 1), head=self.head)
