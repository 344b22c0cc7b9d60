"""Run a teacher once over the batches a training run will draw and write its targets, so the
run can distil without the teacher in memory (docs/distillation.md).

    python launch/cache_teacher.py +model=tiny distill.teacher=TEACHER distill.cache=CACHE \\
        distill.cache_kind=sampled distill.cache_k=12 [the training run's overrides]
    python launch/pretrain.py +model=tiny distill.cache=CACHE [the same overrides]

It takes the training run's overrides and draws the same batches (same data, seed, phases,
batch size and data ranks): run it with torchrun on world_size / parallel.cp ranks of the
training run (targets are stored for whole rows; a cp group reads the same rows). Each batch's
targets are a file named by the batch's content, so the run finds them through skipped steps,
resumes and phases. Rerun it to continue after an interruption: batches already cached are
skipped (their files are written atomically), and a larger train.steps caches only the new ones.
"""
from __future__ import annotations

import logging
import os
import sys
import time

import hydra
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from parallel import build_mesh, init_distributed  # noqa: E402
from train.config import register_configs, validate  # noqa: E402
from train.data import build_data  # noqa: E402
from train.metrics import format_duration  # noqa: E402
from train.teacher import Teacher, TargetCache, batch_key, compute_targets  # noqa: E402

register_configs()
log = logging.getLogger("herd")


def cache_targets(cfg) -> int:
    """Write the targets of every batch the run will draw; returns how many this call wrote."""
    d, p, t = cfg.distill, cfg.parallel, cfg.train
    if not d.teacher or not d.cache:
        raise ValueError("launch/cache_teacher.py needs distill.teacher=PATH and distill.cache=DIR")
    if p.cp != 1:
        raise ValueError(f"parallel.cp={p.cp}: cache on world_size / cp ranks with parallel.cp=1 (targets are "
                         "stored for whole rows, which every rank of a cp group reads)")
    phases = validate(cfg)
    env = init_distributed(t.device, p.backend, p.timeout_s)
    meshes = build_mesh(env, p.dp_shard, p.dp_replicate, p.ep, phases[0].model.n_experts)
    teacher = Teacher(d.teacher, phases[0].model, p, env, meshes)
    cache = TargetCache(d.cache, d.cache_kind, d.cache_k, d.teacher, d.temperature)
    bf16 = t.dtype == "bfloat16" or (t.dtype == "auto" and env.device.type == "cuda")
    autocast = torch.bfloat16 if bf16 else None
    total = sum(phase.steps * phase.grad_accum for phase in phases)
    done, written, start = 0, 0, time.monotonic()
    for phase in phases:
        batches = iter(build_data(phase.data, phase.model, phase.seq_len, phase.batch_size, env.rank,
                                  env.world_size, phase.data_seed))
        for _ in range(phase.steps * phase.grad_accum):
            batch = next(batches)
            missing = torch.tensor(0.0 if cache.has(batch) else 1.0)
            if env.all_reduce(missing, "max").item():  # the teacher's collectives need every rank
                key = batch_key(batch)
                generator = torch.Generator().manual_seed(int(key[:15], 16))  # draws fixed by the batch
                ids, probs = compute_targets(teacher, batch, env.device, d.cache_kind, d.cache_k, d.chunk_size,
                                             generator, autocast, d.temperature)
                if not cache.has(batch):
                    cache.write(batch, ids, probs)
                    written += 1
            done += 1
            if env.is_main and (done % 50 == 0 or done == total):
                elapsed = time.monotonic() - start
                log.info(f"cached {done}/{total} batches per rank | eta "
                         f"{format_duration(elapsed / done * (total - done))}")
    if env.is_main:
        log.info(f"targets of {total} batches per rank in {d.cache} ({written} written now, rank 0)")
    return written


@hydra.main(version_base="1.3", config_path="../configs", config_name="pretrain")
def main(cfg: DictConfig) -> None:
    if OmegaConf.is_missing(cfg, "model"):
        raise SystemExit("choose the student's preset: launch/cache_teacher.py +model=NAME distill.teacher=... "
                         "distill.cache=...")
    logging.getLogger("herd").setLevel(logging.INFO if int(os.environ.get("RANK", "0")) == 0 else logging.WARNING)
    try:
        cache_targets(cfg)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
