"""The training loop: build everything from the config, then step.

One optimizer step = `grad_accum` micro-batches per rank. The loss is normalised by the
number of target tokens in the *global* batch, so N ranks, or N micro-batches, give the same
gradients as one process on the whole batch.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import time
import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F
from omegaconf import OmegaConf

from data.text import TextBatches
from model import ModelArgs, Transformer
from model.params import count_parameters
from parallel import build_mesh, init_distributed, parallelize_model

from .checkpoint import has_train_state, latest_checkpoint, load_checkpoint, save_checkpoint
from .config import validate
from .metrics import MetricsWriter, flops_per_token, peak_flops
from .optim import build_optimizer, build_scheduler

log = logging.getLogger("herd")

# Build the model on the meta device and initialise its shards in place when it would not fit
# comfortably in host memory on every rank; small models are built whole so that any layout
# starts from bitwise the same weights.
_FULL_INIT_MAX_PARAMS = 2_000_000_000


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t)
    return t


def build_model(args: ModelArgs, device: torch.device, seed: int) -> Transformer:
    with torch.device("meta"):
        model = Transformer(args)
    n_params = sum(p.numel() for p in model.parameters())
    torch.manual_seed(seed)
    if n_params <= _FULL_INIT_MAX_PARAMS:
        model = Transformer(args)
        model.init_weights()
    return model


def train(cfg) -> list[dict]:
    """Run training from a resolved config (a DictConfig with the PretrainConfig schema).
    Returns the logged metric rows (rank 0; others get their own)."""
    validate(cfg)
    args = ModelArgs(**OmegaConf.to_container(cfg.model, resolve=True)).validate()
    t, p = cfg.train, cfg.parallel
    env = init_distributed(t.device, p.backend, p.timeout_s)
    meshes = build_mesh(env, p.dp_shard, p.dp_replicate, p.ep, args.n_experts)
    if p.ep > 1:
        raise NotImplementedError("parallel.ep > 1 (expert parallelism) is not available yet; use parallel.ep=1")
    run_dir = cfg.run.dir
    if env.is_main:
        os.makedirs(run_dir, exist_ok=True)
        OmegaConf.save(cfg, os.path.join(run_dir, "config.yaml"), resolve=True)

    model = build_model(args, env.device, t.seed)
    counts = count_parameters(model)
    active_no_embed = sum(a for c, (_, a) in counts.items() if c != "embedding")
    if env.is_main:
        total = sum(n for n, _ in counts.values())
        log.info(f"model: {total / 1e6:,.1f}M parameters, {sum(a for _, a in counts.values()) / 1e6:,.1f}M active; "
                 f"{env.world_size} rank(s) on {env.device.type}")
    meta = next(model.parameters()).is_meta
    model = parallelize_model(model, meshes, param_dtype=p.param_dtype, reduce_dtype=p.reduce_dtype,
                              activation_checkpointing=p.activation_checkpointing, compile=p.compile,
                              device_type=env.device.type)
    if meta:
        model.to_empty(device=env.device)
        model.init_weights()
    else:
        model.to(env.device)

    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, t.steps, cfg.optim)
    data = TextBatches(cfg.data.path, t.seq_len, t.batch_size, args.vocab_size, env.rank, env.world_size, t.seed)

    step, tokens_seen = 0, 0
    # A rerun continues this run's own latest checkpoint; checkpoint.load only seeds a new run.
    own = latest_checkpoint(run_dir) if cfg.checkpoint.resume else None
    source = own or cfg.checkpoint.load
    full = own is not None or (source is not None and not cfg.checkpoint.weights_only and has_train_state(source))
    if source and not full:
        load_checkpoint(source, model)
        if env.is_main:
            log.info(f"loaded weights from {source}; training starts at step 0")
    elif source:
        state = load_checkpoint(source, model, optimizer)
        step, tokens_seen = int(state["step"]), int(state["tokens"])
        scheduler.load_state_dict(state["scheduler"])
        data.load_state_dict(state["data"])
        if env.is_main:
            log.info(f"resumed from {source} at step {step}")

    use_bf16 = t.dtype == "bf16" or (t.dtype == "auto" and env.device.type == "cuda")
    autocast = (torch.autocast(env.device.type, dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext)
    metrics = MetricsWriter(run_dir, env.is_main, t.steps)
    peak = peak_flops(env.device)
    flops_tok = flops_per_token(args, t.seq_len, active_no_embed)
    rows: list[dict] = []
    model.train()
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")

    def save() -> None:
        state = {"step": step, "tokens": tokens_seen, "scheduler": scheduler.state_dict(), "data": data.state_dict()}
        save_checkpoint(run_dir, step, model, optimizer, state, cfg.checkpoint.keep, env.is_main)

    while step < t.steps:
        t0 = time.perf_counter()
        micro = [next(data) for _ in range(t.grad_accum)]
        n_targets = _all_reduce_sum(torch.tensor(float(sum((b["labels"] != -100).sum() for b in micro))))
        sums = torch.zeros(3)  # summed CE, router aux, router z over micro-batches
        for b in micro:
            tokens, labels = b["tokens"].to(env.device), b["labels"].to(env.device)
            with autocast():
                logits, router, _ = model(tokens, return_router_stats=True)
            ce = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
            router = router.float()
            loss = (ce * env.world_size / n_targets
                    + (args.router_aux_loss_coef * router[0] + args.router_z_loss_coef * router[1]) / t.grad_accum)
            loss.backward()
            sums += torch.stack((ce.detach().cpu(), router[0].detach().cpu() / t.grad_accum,
                                 router[1].detach().cpu() / t.grad_accum))
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.max_grad_norm if t.max_grad_norm > 0 else math.inf)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        step_tokens = int(n_targets.item())
        tokens_seen += step_tokens

        if step % cfg.logging.interval == 0 or step == t.steps:
            sums = _all_reduce_sum(sums)
            dt = time.perf_counter() - t0
            row = {"step": step, "loss": (sums[0] / n_targets).item(), "lr": lr,
                   "grad_norm": float(grad_norm), "tokens_per_s": step_tokens / dt, "tokens": tokens_seen,
                   "router_aux": (sums[1] / env.world_size).item(), "router_z": (sums[2] / env.world_size).item(),
                   "step_time_s": dt}
            if peak:
                row["mfu"] = flops_tok * step_tokens / dt / (peak * env.world_size)
                row["memory_gib"] = torch.cuda.max_memory_allocated(env.device) / 2**30
            metrics.write(row)
            rows.append(row)
        if cfg.checkpoint.interval and step % cfg.checkpoint.interval == 0 and step < t.steps:
            save()
    save()
    metrics.close()
    return rows
