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

from model import ModelArgs, Transformer
from model.params import count_parameters
from parallel import build_mesh, clip_grad_norm_, init_distributed, parallelize_model

from .balance import expert_metrics, moe_layers, update_expert_bias
from .checkpoint import (Checkpointer, barrier, export_to_hf, has_train_state, latest_checkpoint, load_checkpoint,
                         load_rank_state)
from .config import validate
from .data import build_data
from .faults import FaultInjector, StopRequest, phase, requeue_slurm_job
from .metrics import MetricsWriter, flops_per_token, peak_flops
from .optim import build_optimizer, build_scheduler
from .wandb_log import WandbLogger

log = logging.getLogger("herd")

# Build the model on the meta device and initialise its shards in place when it would not fit
# comfortably in host memory on every rank; small models are built whole so that any layout
# starts from bitwise the same weights.
_FULL_INIT_MAX_PARAMS = 2_000_000_000


def _all_reduce_sum(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Sum over ranks; the tensor travels on the training device (NCCL reduces only there)."""
    if dist.is_initialized():
        on_device = t.to(device)
        dist.all_reduce(on_device)
        return on_device.to(t.device)
    return t


def _restore_data(data, source: str, rank: int) -> None:
    """Put the loader back where the checkpoint left it. A source whose position is the same on
    every rank (the text source) resumes from rank 0's state in any layout; a sharded stream
    saved with another world size has no state for this rank and restarts from its seed, and
    the log says so."""
    saved = load_rank_state(source, rank)
    if saved is None and getattr(data, "state_is_global", False):
        saved = load_rank_state(source, 0)
    state = saved["data"] if saved else None
    if state is None:
        log.warning(f"rank {rank}: the checkpoint holds no data-loader state for this rank (saved with another "
                    "world size); the data stream restarts from its seed")
        return
    try:
        data.load_state_dict(state)
    except ValueError as e:
        log.warning(f"rank {rank}: data-loader state does not fit this run ({e}); the data stream restarts "
                    "from its seed")


def build_model(args: ModelArgs, seed: int) -> Transformer:
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
    run_dir = cfg.run.dir
    if env.is_main:
        os.makedirs(run_dir, exist_ok=True)
        OmegaConf.save(cfg, os.path.join(run_dir, "config.yaml"), resolve=True)

    model = build_model(args, t.seed)
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
    data = build_data(cfg.data, args.vocab_size, t.seq_len, t.batch_size, env.rank, env.world_size, t.seed)
    batches = iter(data)

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
        _restore_data(data, source, env.rank)
        if env.is_main:
            log.info(f"resumed from {source} at step {step}")

    use_bf16 = t.dtype == "bf16" or (t.dtype == "auto" and env.device.type == "cuda")
    autocast = (torch.autocast(env.device.type, dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext)
    metrics = MetricsWriter(run_dir, env.is_main, t.steps)
    wandb_run = WandbLogger(cfg.logging.wandb, run_dir, OmegaConf.to_container(cfg, resolve=True), env.is_main)
    peak = peak_flops(env.device)
    flops_tok = flops_per_token(args, t.seq_len, active_no_embed)
    rows: list[dict] = []
    moes = moe_layers(model)
    aux_free = args.load_balance == "aux_free" and bool(moes)
    table_every = cfg.logging.expert_table_interval
    model.train()
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")

    faults = FaultInjector(t.faults, env.rank)
    checkpointer = Checkpointer(run_dir, cfg.checkpoint.keep, env.rank, cfg.checkpoint.async_save,
                                before_rename=faults.crash_in_save)
    stop = StopRequest()
    nonfinite_in_row = 0

    def save() -> None:
        with phase("checkpoint save", env.rank, step):
            state = {"step": step, "tokens": tokens_seen, "scheduler": scheduler.state_dict()}
            checkpointer.save(step, model, optimizer, state, rank_state={"data": data.state_dict()})

    while step < t.steps:
        t0 = time.perf_counter()
        faults.maybe_hang(step + 1)
        micro = [next(batches) for _ in range(t.grad_accum)]
        with phase("counting targets (all-reduce)", env.rank, step + 1):
            n_targets = _all_reduce_sum(torch.tensor(float(sum((b["labels"] != -100).sum() for b in micro))),
                                        env.device)
        # Summed CE, router aux, router z and routed token slots over micro-batches; float64 counts
        # slots exactly at any scale.
        sums = torch.zeros(4, dtype=torch.float64)
        skipped: dict = {}
        expert_counts = torch.zeros(len(moes), args.n_experts, dtype=torch.long)  # tokens per expert, this step
        for b in micro:
            tokens, labels = b["tokens"].to(env.device), b["labels"].to(env.device)
            extra = {k: b[k].to(env.device) for k in ("positions", "doc_ids") if k in b}
            if args.vision.enabled:
                # Every rank runs the encoder every step (an empty batch of tiles when a batch has
                # no images) so that FSDP's collectives and the optimizer state stay uniform.
                size = args.vision.image_size
                extra["images"] = b.get("images", torch.empty(0, 3, size, size)).to(env.device)
            with phase("forward/backward (FSDP and expert collectives)", env.rank, step + 1):
                with autocast():
                    logits, router, layer_counts = model(tokens, **extra, return_router_stats=True)
                ce = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100,
                                     reduction="sum")
                ce = faults.loss(ce, step + 1)
                router = router.float()
                loss = (ce * env.world_size / n_targets
                        + (args.aux_loss_weight * router[0] + args.router_z_loss_coef * router[1]) / t.grad_accum)
                loss.backward()
            sums += torch.stack((ce.detach().cpu().double(), router[0].detach().cpu().double() / t.grad_accum,
                                 router[1].detach().cpu().double() / t.grad_accum,
                                 torch.tensor(float(tokens.numel() * args.top_k), dtype=torch.float64)))
            expert_counts += layer_counts.cpu()
            skipped = b.get("skipped", skipped)
        # Dense and expert gradients live on different meshes under EP: clip_grad_norm_ combines them.
        with phase("gradient norm (all-reduce)", env.rank, step + 1):
            grad_norm = clip_grad_norm_(model.parameters(), t.max_grad_norm if t.max_grad_norm > 0 else math.inf)
        lr = scheduler.get_last_lr()[0]
        # The norm is global, so every rank takes the same decision. A non-finite step changes
        # nothing (no update, no schedule step): the weights, and so every checkpoint, stay finite.
        if not math.isfinite(float(grad_norm)):
            optimizer.zero_grad(set_to_none=True)
            nonfinite_in_row += 1
            if env.is_main:
                log.warning(f"step {step + 1}: non-finite loss or gradient norm; step skipped "
                            f"({nonfinite_in_row} in a row, at most {t.max_nonfinite_in_row})")
            if nonfinite_in_row > t.max_nonfinite_in_row:
                checkpointer.wait()
                last = latest_checkpoint(run_dir)
                raise FloatingPointError(
                    f"{nonfinite_in_row} steps in a row had a non-finite loss or gradient norm (last at step "
                    f"{step + 1}); stopping. The last checkpoint ({last or 'none'}) holds finite weights; lower "
                    "optim.lr or inspect the data, then rerun to resume from it")
            metrics.write_event({"step": step + 1, "nonfinite_skipped": nonfinite_in_row})
            continue
        nonfinite_in_row = 0
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        step_tokens = int(n_targets.item())
        tokens_seen += step_tokens

        table_now = bool(moes) and table_every > 0 and step % table_every == 0
        log_now = step % cfg.logging.interval == 0 or step == t.steps or table_now
        if aux_free or (log_now and moes):
            expert_counts = _all_reduce_sum(expert_counts, env.device)  # the whole dp world's routing
        if aux_free:
            update_expert_bias(moes, expert_counts, args.aux_free_bias_update_rate)

        if log_now:
            sums = _all_reduce_sum(sums, env.device)
            dt = time.perf_counter() - t0
            row = {"step": step, "loss": (sums[0] / n_targets).item(), "lr": lr,
                   "grad_norm": float(grad_norm), "tokens_per_s": step_tokens / dt, "tokens": tokens_seen,
                   "router_aux": (sums[1] / env.world_size).item(), "router_z": (sums[2] / env.world_size).item(),
                   "step_time_s": dt}
            if moes:
                row.update(expert_metrics(expert_counts, model.moe_layers, int(sums[3])))
            if skipped:  # corrupt or unreadable samples, counted since the start of each rank's stream
                names = sorted(skipped)
                totals = _all_reduce_sum(torch.tensor([float(skipped[k]) for k in names]), env.device)
                row["data/skipped"] = int(totals.sum())
                row.update({f"data/skipped/{k}": int(v) for k, v in zip(names, totals) if v})
            if table_now:
                row["expert_counts"] = expert_counts.tolist()  # [MoE layer (ascending)][expert]
            if peak:
                row["mfu"] = flops_tok * step_tokens / dt / (peak * env.world_size)
                row["memory_gib"] = torch.cuda.max_memory_allocated(env.device) / 2**30
            metrics.write(row)
            wandb_run.log(row, step)
            rows.append(row)
        if stop.agreed(env.device):
            if env.is_main:
                log.warning(f"stop signal received: saving a checkpoint at step {step} and exiting")
            save()
            checkpointer.wait()
            wandb_run.finish()  # before the requeue: Slurm may end the job right after it
            if env.is_main:
                requeue_slurm_job()
            stop.restore()
            metrics.close()
            return rows
        if cfg.checkpoint.interval and step % cfg.checkpoint.interval == 0 and step < t.steps:
            save()
    save()
    checkpointer.wait()
    stop.restore()
    if cfg.checkpoint.export_hf and env.is_main:
        final = latest_checkpoint(run_dir)
        export_to_hf(final, cfg.checkpoint.export_hf)
        log.info(f"exported {final} to {cfg.checkpoint.export_hf} (Hugging Face format)")
    barrier()
    wandb_run.finish()
    metrics.close()
    return rows
