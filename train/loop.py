"""The Trainer: build everything from the config, resume, step, and shut down one way.

    Trainer(cfg).run()
      resume()          the run's own latest checkpoint, or checkpoint.load, or step 0
      train_step()      grad_accum x forward_backward(), gradient norm, optimizer_step()
      log(row)          metrics.jsonl, console, wandb
      checkpoint / stop a checkpoint every checkpoint.interval steps; a preemption signal stops
      shutdown()        final or stop checkpoint, HF export, requeue, summary: every exit goes here

One optimizer step = `grad_accum` micro-batches per rank; the loss is in train/loss.py. Where
the state of a run lives: train/state.py (TrainState). Where a run is written to disk:
train/checkpoint.py.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import math
import os
import time
import warnings

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from model import Transformer
from model.params import count_parameters
from parallel import build_mesh, clip_grad_norm_, init_distributed, mesh_shape
from parallel.context import ContextParallel, shard_batch

from .balance import expert_metrics, moe_layers, update_expert_bias
from .build import build_parallel_model
from .checkpoint import (Checkpointer, checkpoint_step, export_to_hf, find_resume_checkpoint, has_train_state,
                         load_checkpoint)
from .config import config_for_disk, data_args, model_args, validate
from .data import build_data, check_sources
from .faults import FaultInjector, StopRequest, failure_context, requeue_slurm_job
from .distill import soft_weight
from .loss import DistillStep, bucket_names, compute_loss, count_targets
from .memory import preflight
from .metrics import MetricsWriter, flops_per_token, format_duration, peak_flops
from .optim import build_optimizer, build_scheduler
from .phases import Phase, phase_at
from .state import TrainState
from .teacher import CachedTeacher, Teacher
from .wandb_log import WandbLogger

log = logging.getLogger("herd")


class Trainer:
    def __init__(self, cfg):
        """Build in the order that fails fastest: config, process group, data (a bad source or
        tokenizer stops the run in seconds), then the model and optimizer."""
        self.phases = validate(cfg)
        self.phase = self.phases[0]
        self.cfg, t, p = cfg, cfg.train, cfg.parallel
        self.args = model_args(cfg)
        # The layout is checked before the process group exists, so that its error is a config
        # error (the same on every rank), not one per rank.
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        mesh_shape(world_size, p.dp_shard, p.dp_replicate, p.ep, self.args.n_experts, p.cp)
        if t.preflight:  # a run that cannot fit stops here, in seconds, with the estimate
            device = t.device if t.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
            preflight(cfg, self.phases, world_size, device)
        self.env = init_distributed(t.device, p.backend, p.timeout_s)
        check_ranks_agree(self.env, cfg)
        self.meshes = build_mesh(self.env, p.dp_shard, p.dp_replicate, p.ep, self.args.n_experts, p.cp)
        # Context parallelism: cp consecutive ranks load the same rows and each keeps its part.
        self.cp = ContextParallel.from_mesh(self.meshes.cp) if p.cp > 1 else None
        self.run_dir = cfg.run.dir
        if self.env.is_main:
            os.makedirs(self.run_dir, exist_ok=True)
            OmegaConf.save(OmegaConf.create(config_for_disk(cfg)), os.path.join(self.run_dir, "config.yaml"))

        for phase in self.phases[1:]:  # every phase's shards exist, before any weights do
            check_sources(phase.data)
        data = self.build_phase_data(self.phase)
        # The first phase's model: the run's, with the RoPE settings the phase may change.
        self.model = build_parallel_model(self.phase.model, t.seed, p, self.env, self.meshes, cfg.optim.metap)
        self.optimizer = build_optimizer(self.model, cfg.optim, self.phase.model)
        if cfg.distill.cache:  # targets written by launch/cache_teacher.py: no teacher in memory
            self.teacher = CachedTeacher(cfg.distill.cache, cfg.distill.temperature)
        elif cfg.distill.teacher:
            self.teacher = Teacher(cfg.distill.teacher, self.phase.model, p, self.env, self.meshes)
        else:
            self.teacher = None
        scheduler = build_scheduler(self.optimizer, t.steps, cfg.optim, self.phases)
        self.state = TrainState(scheduler, data, self.env.rank)
        self.faults = FaultInjector(t.faults, self.env.rank)
        self.checkpointer = Checkpointer(self.run_dir, cfg.checkpoint.keep, self.env.rank, cfg.checkpoint.async_save,
                                         before_rename=self.faults.crash_in_save)

        self.moes = moe_layers(self.model)
        self.aux_free = self.args.load_balance == "aux_free" and bool(self.moes)
        use_bf16 = t.dtype == "bfloat16" or (t.dtype == "auto" and self.env.device.type == "cuda")
        self.autocast_dtype = torch.bfloat16 if use_bf16 else None
        with torch.device("meta"):
            counts = count_parameters(Transformer(self.args))
        self.active_params = sum(a for c, (_, a) in counts.items() if c != "embedding")
        self.flops_per_token = flops_per_token(self.phase.model, self.phase.seq_len, self.active_params)
        self.batches = None  # the data iterator, started at the first step
        self.peak_flops = peak_flops(self.env.device)
        if self.env.is_main:
            log.info(f"model: {sum(n for n, _ in counts.values()) / 1e6:,.1f}M parameters, "
                     f"{sum(a for _, a in counts.values()) / 1e6:,.1f}M active; {self.env.world_size} rank(s) on "
                     f"{self.env.device.type}"
                     + (f" in context-parallel groups of {self.cp.size}" if self.cp is not None else ""))
        self.rows: list[dict] = []
        self.skipped_in_row = {"nonfinite": 0, "no_targets": 0}  # steps not taken, in a row, by reason
        self.saved_step: int | None = None  # the step of the newest checkpoint this attempt wrote or loaded
        self.last_checkpoint: str | None = None  # and its path

    # -- phases ---------------------------------------------------------------------------
    def build_phase_data(self, phase: Phase):
        # A rank whose data source produces nothing for this long says so, before the other
        # ranks' collectives time out waiting for it.
        stall_s = max(30.0, self.cfg.parallel.timeout_s / 2)
        cp = self.cfg.parallel.cp  # the ranks of a context-parallel group read the same rows
        return build_data(phase.data, phase.model, phase.seq_len, phase.batch_size, self.env.rank // cp,
                          self.env.world_size // cp, phase.data_seed, stall_s)

    def enter_phase(self, phase: Phase) -> None:
        """Switch to `phase` at a step boundary: its data stream (from its own seed), its RoPE
        settings, its sequence length in the FLOP count. Weights, optimizer and counters stay."""
        if phase.index == self.phase.index:
            return
        self.close_batches()
        self.state.data = self.build_phase_data(phase)
        self.model.args = phase.model
        self.phase = phase
        self.state.phase = phase.index
        self.flops_per_token = flops_per_token(phase.model, phase.seq_len, self.active_params)
        if self.env.is_main:
            log.info(f"phase {phase.name} ({phase.index + 1} of {len(self.phases)}): steps {phase.start + 1}-"
                     f"{phase.end}, seq_len {phase.seq_len}, batch {phase.batch_size} x {phase.grad_accum} per "
                     f"{self.batch_owner()}, "
                     f"lr {phase.lr:g}")

    def batch_owner(self) -> str:
        """Who reads a batch of its own: a rank, or a context-parallel group."""
        return f"context-parallel group of {self.cp.size} ranks" if self.cp is not None else "rank"

    def close_batches(self) -> None:
        close = getattr(self.batches, "close", None)
        if close is not None:
            close()  # the loader's worker processes end here, not at interpreter exit
        self.batches = None

    # -- start ----------------------------------------------------------------------------
    def resume(self) -> None:
        """A rerun continues this run's own newest checkpoint that verifies (a damaged newer one
        is skipped with a warning); checkpoint.load only seeds a new run (its weights, or its
        whole training state unless weights_only)."""
        ck = self.cfg.checkpoint
        own = None
        if ck.resume:
            own = find_resume_checkpoint(self.run_dir, self.env.rank, self.env.world_size, self.env.all_reduce,
                                         data_state_is_global=self.state.data_state_is_global)
        source = own or ck.load
        if source is None:
            return
        if own is None and (ck.weights_only or not has_train_state(source)):
            load_checkpoint(source, self.model)
            if self.env.is_main:
                log.info(f"loaded weights from {source}; training starts at step 0")
            return
        # The phase the checkpoint's next step belongs to decides which data the state loads into.
        self.enter_phase(phase_at(self.phases, checkpoint_step(source)))
        load_checkpoint(source, self.model, self.optimizer, self.state, verified=own is not None)
        if own is not None:
            self.checkpointer.resumed_from(self.state.step)  # what pruning may touch
            self.saved_step, self.last_checkpoint = self.state.step, own
        if self.env.is_main:
            log.info(f"resumed from {source} at step {self.state.step}")

    # -- one step -------------------------------------------------------------------------
    def forward_backward(self, micro: list[dict], n_targets: torch.Tensor, step: int) -> dict:
        """Backward of every micro-batch; returns the step's sums for the metrics (this rank's)."""
        sums = torch.zeros(5, dtype=torch.float64)  # CE, router aux, router z, routed token slots, soft targets
        counts = torch.zeros(len(self.moes), self.args.n_experts, dtype=torch.long)  # tokens per expert
        by_position = None  # [2, buckets]: CE and targets per bucket of in-document position
        accum = len(micro)
        for batch in micro:
            with failure_context("forward/backward (FSDP and expert collectives)", self.env.rank, step):
                out = compute_loss(self.model, batch, self.args, global_targets=n_targets,
                                   world_size=self.env.world_size, grad_accum=accum,
                                   autocast_dtype=self.autocast_dtype, position_buckets=self.position_buckets(),
                                   distill=self.distill_step(step))
                self.faults.loss(out.loss, step).backward()
            sums += torch.stack((out.ce_sum.cpu().double(), out.router[0].cpu().double() / accum,
                                 out.router[1].cpu().double() / accum,
                                 torch.tensor(float(out.routed_slots), dtype=torch.float64),
                                 out.soft_sum.cpu().double() if out.soft_sum is not None else torch.zeros((), dtype=torch.float64)))
            counts += out.expert_counts
            if out.by_position is not None:
                by_position = out.by_position if by_position is None else by_position + out.by_position
        return {"sums": sums, "expert_counts": counts, "skipped": micro[-1].get("skipped", {}),
                "by_position": by_position}

    def distill_step(self, step: int) -> DistillStep | None:
        """The teacher and this step's soft-target weight, in a distillation run."""
        if self.teacher is None:
            return None
        d = self.cfg.distill
        weight = d.weight if d.weight_end is None else soft_weight(step - 1, self.cfg.train.steps, d.weight,
                                                                      d.weight_end)
        return DistillStep(self.teacher, d.temperature, weight, d.chunk_size)

    def position_buckets(self) -> list[int] | None:
        """The loss-by-position edges, when this phase's rows reach past the first."""
        edges = list(self.cfg.logging.position_buckets)
        return edges if edges and self.phase.seq_len > edges[0] else None

    def optimizer_step(self, grad_norm: torch.Tensor, step: int) -> bool:
        """Step the optimizer and the schedule, unless the gradient norm is not finite: then the
        step changes nothing (the weights, and so every checkpoint, stay finite) and is tried
        again on the next batch; too many in a row stop the run. The norm is global, so every
        rank takes the same decision."""
        if math.isfinite(float(grad_norm)):
            self.skipped_in_row["nonfinite"] = 0
            self.optimizer.step()
            self.state.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            return True
        self.optimizer.zero_grad(set_to_none=True)
        n = self.skip("nonfinite", step, "non-finite loss or gradient norm")
        if n is not None:
            self.checkpointer.wait()
            last = self.newest_checkpoint()
            raise FloatingPointError(
                f"{n} steps in a row had a non-finite loss or gradient norm (last at step {step}); stopping. The "
                f"last checkpoint ({last or 'none'}) holds finite weights; lower optim.lr or inspect the data, then "
                "rerun to resume from it")
        return False

    def skip(self, kind: str, step: int, why: str) -> int | None:
        """Count a step not taken (`kind` in a row), say so, and write `{kind}_skipped` to
        metrics.jsonl; returns the count when it exceeds train.max_nonfinite_in_row (the caller
        stops the run), else None."""
        self.skipped_in_row[kind] += 1
        n, limit = self.skipped_in_row[kind], self.cfg.train.max_nonfinite_in_row
        if self.env.is_main:
            log.warning(f"step {step}: {why}; step skipped ({n} in a row, at most {limit})")
        if n > limit:
            return n
        self.metrics.write_event({"step": step, f"{kind}_skipped": n})
        return None

    def skip_empty_batch(self, step: int) -> None:
        """A global batch without a single target token (only media placeholders and padding)
        would train on nothing and log a NaN loss: the step is not taken, and is reported and
        counted. A data source that keeps yielding such batches stops the run, named."""
        n = self.skip("no_targets", step, "the batch holds no target token (only media placeholders or padding)")
        if n is not None:
            args = data_args(self.cfg)
            where = (f"data.path={args.path or 'the pydoc topics'}" if args.kind == "text"
                     else ", ".join(str(s.urls) for s in args.resolved_sources()))
            raise ValueError(f"{n} batches in a row held no target token: the data ({where}) "
                             "yields documents that are all media placeholders; check its text, or data.max_tiles")

    def train_step(self) -> dict | None:
        """One optimizer step. Returns its metrics row when the step is logged; None when it is
        not, or when it was skipped as non-finite."""
        t, step = self.cfg.train, self.state.step + 1
        t0 = time.perf_counter()
        self.faults.maybe_hang(step)
        if self.batches is None:
            self.batches = iter(self.state.data)
        micro = self.faults.batches([next(self.batches) for _ in range(self.phase.grad_accum)], step)
        if isinstance(self.teacher, CachedTeacher):
            micro = [self.teacher.attach(b) for b in micro]
        if self.cp is not None:
            micro = [shard_batch(b, self.cp, self.phase.model, self.env.device) for b in micro]
        with failure_context("counting targets (all-reduce)", self.env.rank, step):
            n_targets = self.env.all_reduce(count_targets(micro))
        if n_targets.item() == 0:
            self.skip_empty_batch(step)
            return None
        self.skipped_in_row["no_targets"] = 0
        stats = self.forward_backward(micro, n_targets, step)
        with failure_context("gradient norm (all-reduce)", self.env.rank, step):
            grad_norm = clip_grad_norm_(self.model.parameters(), t.max_grad_norm if t.max_grad_norm > 0 else math.inf)
        lr = self.state.scheduler.get_last_lr()[0]
        if not self.optimizer_step(grad_norm, step):
            return None
        self.state.step = step
        self.state.tokens += int(n_targets.item())

        every = self.cfg.logging.expert_table_interval
        table_now = bool(self.moes) and every > 0 and step % every == 0
        log_now = step % self.cfg.logging.interval == 0 or step == t.steps or table_now
        counts = stats["expert_counts"]
        if self.aux_free or (log_now and self.moes):
            counts = self.env.all_reduce(counts)  # the whole dp world's routing
        if self.aux_free:
            update_expert_bias(self.moes, counts, self.args.aux_free_bias_update_rate)
        if not log_now:
            return None
        row = self.metrics_row(step, lr, grad_norm, n_targets, stats["sums"], counts, stats["skipped"],
                               time.perf_counter() - t0, table_now)
        if stats["by_position"] is not None:
            ce, n = self.env.all_reduce(stats["by_position"])
            row.update({name: (s / c).item() for name, s, c in
                        zip(bucket_names(list(self.cfg.logging.position_buckets)), ce, n) if c > 0})
        return row

    def metrics_row(self, step, lr, grad_norm, n_targets, sums, counts, skipped, dt, table_now) -> dict:
        """One metrics.jsonl line: global numbers, the same on every rank."""
        sums = self.env.all_reduce(sums)
        world, tokens = self.env.world_size, int(n_targets.item())
        row = {"step": step, **({"phase": self.phase.name} if len(self.phases) > 1 else {}),
               "loss": (sums[0] / n_targets).item(), "lr": lr, "grad_norm": float(grad_norm),
               "tokens_per_s": tokens / dt, "tokens": self.state.tokens, "router_aux": (sums[1] / world).item(),
               "router_z": (sums[2] / world).item(), "step_time_s": dt}
        if self.teacher is not None:  # "loss" is the hard CE; the soft term and its weight beside it
            row["loss_soft"] = (sums[4] / n_targets).item()
            row["distill_weight"] = self.distill_step(step).weight
        if self.moes:
            row.update(expert_metrics(counts, self.model.moe_layers, int(sums[3])))
        if skipped:  # corrupt or unreadable samples, counted since the start of each rank's stream
            names = sorted(skipped)
            totals = self.env.all_reduce(torch.tensor([float(skipped[k]) for k in names]))
            row["data/skipped"] = int(totals.sum())
            row.update({f"data/skipped/{k}": int(v) for k, v in zip(names, totals) if v})
        if table_now:
            row["expert_counts"] = counts.tolist()  # [MoE layer (ascending)][expert]
        if self.peak_flops:
            row["mfu"] = self.flops_per_token * tokens / dt / (self.peak_flops * world)
            row["memory_gib"] = torch.cuda.max_memory_allocated(self.env.device) / 2**30
        return row

    def log(self, row: dict) -> None:
        self.metrics.write(row)
        self.wandb.log(row, row["step"])
        self.rows.append(row)

    def save(self) -> None:
        with failure_context("checkpoint save", self.env.rank, self.state.step):
            self.checkpointer.save(self.state.step, self.model, self.optimizer, self.state)
        self.saved_step = self.state.step

    def newest_checkpoint(self) -> str | None:
        """The checkpoint this run saved last (completed), or resumed from: never another run's
        that happens to have a higher step in the same run.dir."""
        return self.checkpointer.last_saved or self.last_checkpoint

    # -- the run --------------------------------------------------------------------------
    def run(self) -> list[dict]:
        """Train to train.steps (or until a stop signal); returns the logged metric rows."""
        self.resume()
        self.started = (time.perf_counter(), self.state.step)
        self.metrics = MetricsWriter(self.run_dir, self.env.is_main, self.cfg.train.steps, self.state.step)
        self.wandb = WandbLogger(self.cfg.logging.wandb, self.run_dir, config_for_disk(self.cfg), self.env.is_main)
        self.stop = StopRequest()
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        self.model.train()
        outcome = "failed"
        try:
            interval = self.cfg.checkpoint.interval
            while self.state.step < self.cfg.train.steps:
                row = self.train_step()
                if row is not None:
                    self.log(row)
                if self.stop.agreed(self.env.device):
                    outcome = "stopped"
                    break
                step = self.state.step
                switch = step == self.phase.end and step < self.cfg.train.steps
                due = (interval and step % interval == 0 and step < self.cfg.train.steps) or switch
                if due and step != self.saved_step:  # (a skipped step leaves the step where it was)
                    self.save()  # at a switch: the last step of the phase that ends, tagged with it
                if switch:
                    self.enter_phase(phase_at(self.phases, step))
            else:
                outcome = "finished"
        finally:
            self.shutdown(outcome)
        return self.rows

    def shutdown(self, outcome: str) -> None:
        """Every exit: finished, stopped by a signal, or failed. A finished or stopped run saves
        its last step (the only collectives here; a failed run may have lost a rank), exports
        when asked, and says where everything is; a stopped one is requeued under Slurm."""
        main = self.env.is_main
        try:
            if outcome != "failed":
                if outcome == "stopped" and main:
                    log.warning(f"stopping: saving a checkpoint at step {self.state.step}")
                if self.saved_step != self.state.step:
                    self.save()
                self.checkpointer.wait()
            if outcome == "finished" and self.cfg.checkpoint.export_hf and main:
                final = self.newest_checkpoint()
                export_to_hf(final, self.cfg.checkpoint.export_hf)
                log.info(f"exported {final} to {self.cfg.checkpoint.export_hf} (Hugging Face format)")
            if outcome != "failed":
                self.env.barrier()
        finally:
            self.close_batches()
            self.stop.restore()
            self.wandb.finish()  # before a requeue: Slurm may end the job right after it
            self.metrics.close()
            if main and outcome != "failed":
                log.info(self.summary(outcome))
            if main and outcome == "stopped":
                requeue_slurm_job()

    def summary(self, outcome: str) -> str:
        t0, first = self.started
        step, steps = self.state.step, self.cfg.train.steps
        wall = format_duration(time.perf_counter() - t0)
        ckpt = self.newest_checkpoint() or "none"
        where = f"checkpoint {ckpt}; metrics {self.metrics.path}"
        if self.cfg.checkpoint.export_hf and outcome == "finished":
            where += f"; Hugging Face export {self.cfg.checkpoint.export_hf}"
        if step == first:
            return f"nothing to train: the run is at step {step} of {steps}; {where}"
        loss = f", last loss {self.rows[-1]['loss']:.4f}" if self.rows else ""
        head = (f"finished steps {first + 1}-{step} of {steps}" if outcome == "finished"
                else f"stopped at step {step} of {steps} (rerun the same command to resume)")
        return f"{head} in {wall}: {self.state.tokens:,} tokens trained in all{loss}; {where}"


def check_ranks_agree(env, cfg) -> None:
    """Every rank runs the same config and the same herd code: a rank started with other
    overrides or from another checkout fails here, named, instead of in a mismatched collective."""
    if env.world_size == 1:
        return
    mine = (_digest(OmegaConf.to_yaml(cfg, resolve=True)), code_version())
    theirs = [None] * env.world_size
    dist.all_gather_object(theirs, mine)
    for what, i in (("config", 0), ("herd code", 1)):
        groups: dict[str, list[int]] = {}
        for rank, digests in enumerate(theirs):
            groups.setdefault(digests[i], []).append(rank)
        if len(groups) > 1:
            split = "; ".join(f"ranks {ranks}" for ranks in sorted(groups.values()))
            raise ValueError(f"the ranks were started with different {what}: {split} agree among themselves; start "
                             "every rank with the same command, overrides and checkout")


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@functools.cache
def code_version() -> str:
    """A digest of herd's Python sources (model, parallel, data, train)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    h = hashlib.sha256()
    for package in ("model", "parallel", "data", "train"):
        for dirpath, dirnames, files in sorted(os.walk(os.path.join(root, package))):
            dirnames.sort()
            for name in sorted(f for f in files if f.endswith(".py")):
                with open(os.path.join(dirpath, name), "rb") as f:
                    h.update(name.encode() + f.read())
    return h.hexdigest()


def train(cfg) -> list[dict]:
    """Run training from a composed config (a DictConfig with the PretrainConfig schema).
    Returns the logged metric rows (every rank gets the same global numbers)."""
    return Trainer(cfg).run()
