"""The teacher of a distillation run: online, or cached targets.

The online teacher of a distillation run (`distill.teacher=PATH`): a herd checkpoint (a
step directory, or a run directory whose newest checkpoint is taken) or a Hugging Face Llama 4
folder, built and sharded like the student (FSDP, and EP with the same meshes), frozen: eval
mode, no gradients, no optimizer state. It runs under no_grad on the student's tokens,
positions, document ids and images and hands the loss its final hidden states and output head
(train/distill.py), so its logits are made chunk by chunk too.

The output head is gathered whole once (in the FSDP compute dtype) and kept: the loss calls it
during the student's backward, when the teacher's own FSDP state is not active.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
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
        autocast = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
                    else contextlib.nullcontext())
        with autocast:
            hidden = self.model(**inputs, output_fn=lambda h, head: h)
        return TeacherTargets("logits", hidden=hidden.flatten(0, 1), head=self.head)


# ---------------------------------------------------------------- cached targets


def batch_key(batch: dict) -> str:
    """A micro-batch's identity: the sha256 of its whole rows (tokens, positions, doc ids), so
    cached targets follow the batch through skipped steps, resumes and phases."""
    h = hashlib.sha256()
    for key in ("tokens", "positions", "doc_ids"):
        if key in batch:
            t = batch[key].detach().to("cpu", torch.int64).contiguous()
            h.update(key.encode() + str(tuple(t.shape)).encode() + t.numpy().tobytes())
    return h.hexdigest()


class TargetCache:
    """Teacher targets written once by launch/cache_teacher.py: one file per micro-batch,
    DIR/<key[:2]>/<key>.pt with `ids` [B, T, k] (int32) and `probs` [B, T, k] (float16: top-k
    probabilities, or for sampled targets the weight of each draw), plus DIR/cache.json saying
    what they are. Loaded tensors only (weights_only), never code."""

    def __init__(self, path: str, kind: str | None = None, k: int | None = None, teacher: str | None = None,
                 temperature: float = 1.0):
        self.path = path
        meta = os.path.join(path, "cache.json")
        if kind is None:  # reading
            if not os.path.isfile(meta):
                raise FileNotFoundError(f"distill.cache={path!r} holds no cache.json: write it with "
                                        "launch/cache_teacher.py")
            with open(meta) as f:
                info = json.load(f)
            self.kind, self.k, self.teacher = info["kind"], int(info["k"]), info.get("teacher")
            self.temperature = float(info.get("temperature", 1.0))
        else:
            if kind not in ("topk", "sampled"):
                raise ValueError(f"distill.cache_kind={kind!r} is not one of topk, sampled")
            self.kind, self.k, self.teacher, self.temperature = kind, k, teacher, temperature
            os.makedirs(path, exist_ok=True)
            if os.path.isfile(meta):
                with open(meta) as f:
                    info = json.load(f)
                held = (info["kind"], int(info["k"]), float(info.get("temperature", 1.0)))
                if held != (kind, k, temperature if kind == "sampled" else 1.0):
                    raise ValueError(f"distill.cache={path!r} holds {held[0]} targets with k={held[1]} (temperature "
                                     f"{held[2]:g}); this run asks for {kind} with k={k}: use another directory")
            else:
                tmp = meta + ".tmp"
                with open(tmp, "w") as f:
                    json.dump({"kind": kind, "k": k, "teacher": teacher,
                               "temperature": temperature if kind == "sampled" else 1.0}, f)
                os.replace(tmp, meta)

    def file(self, key: str) -> str:
        return os.path.join(self.path, key[:2], key + ".pt")

    def has(self, batch: dict) -> bool:
        return os.path.isfile(self.file(batch_key(batch)))

    def write(self, batch: dict, ids: torch.Tensor, probs: torch.Tensor) -> None:
        path = self.file(batch_key(batch))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        torch.save({"ids": ids.to(torch.int32).cpu(), "probs": probs.to(torch.float16).cpu()}, tmp)
        os.replace(tmp, path)  # a killed writer leaves no partial file under the final name

    def attach(self, batch: dict) -> dict:
        """The batch with its cached `teacher_ids` and `teacher_probs` [B, T, k]."""
        path = self.file(batch_key(batch))
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"distill.cache={self.path!r} has no targets for this batch ({os.path.basename(path)}): the cache "
                "was written for other data, another seed or another layout (world size, batch, seq_len); "
                "run launch/cache_teacher.py with this run's overrides")
        saved = torch.load(path, weights_only=True)
        if saved["ids"].shape[:2] != batch["tokens"].shape:
            raise ValueError(f"{path}: targets of shape {tuple(saved['ids'].shape)} for a batch of "
                             f"{tuple(batch['tokens'].shape)} tokens")
        return {**batch, "teacher_ids": saved["ids"].long(), "teacher_probs": saved["probs"].float()}


class CachedTeacher:
    """The teacher of a run trained from a TargetCache: no model in memory."""

    def __init__(self, path: str, temperature: float):
        self.cache = TargetCache(path)
        if self.cache.kind == "sampled" and self.cache.temperature != temperature:
            raise ValueError(f"distill.cache={path!r} holds tokens drawn at temperature {self.cache.temperature:g} "
                             f"but distill.temperature={temperature:g}; draw them again at this temperature")

    def attach(self, batch: dict) -> dict:
        return self.cache.attach(batch)

    def targets(self, batch: dict, device: torch.device, autocast_dtype=None) -> TeacherTargets:
        ids, probs = batch["teacher_ids"], batch["teacher_probs"]
        return TeacherTargets(self.cache.kind, ids=ids.to(device).flatten(0, 1), probs=probs.to(device).flatten(0, 1))


def compute_targets(teacher: Teacher, batch: dict, device: torch.device, kind: str, k: int, chunk_size: int,
                    generator: torch.Generator, autocast_dtype=None,
                    temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, probs) [B, T, k] of the teacher on a batch: its k most likely tokens and their
    probabilities (at temperature 1; the loss tempers them), or k tokens drawn from its
    distribution at `temperature` with weight 1/k each. Chunked over tokens, so the full logits
    never exist."""
    B, T = batch["tokens"].shape
    hidden = teacher.targets(batch, device, autocast_dtype).hidden
    ids, probs = [], []
    for start in range(0, hidden.shape[0], chunk_size):
        logits = teacher.head(hidden[start: start + chunk_size]).float()
        p = F.softmax(logits if kind == "topk" else logits / temperature, dim=-1)
        if kind == "topk":
            top_p, top_i = p.topk(k, dim=-1)
            ids.append(top_i)
            probs.append(top_p)
        else:
            drawn = torch.multinomial(p.cpu(), k, replacement=True, generator=generator).to(p.device)
            ids.append(drawn)
            probs.append(torch.full(drawn.shape, 1.0 / k, device=p.device))
    return torch.cat(ids).view(B, T, k), torch.cat(probs).view(B, T, k)
