"""Process groups and the device mesh.

Mesh dimensions follow torchtitan's names: `dp_replicate` (HSDP replicas), `dp_shard` (FSDP
ranks) and, inside dp_shard, `ep` (expert-parallel ranks) with `dp_shard_mod_ep` =
dp_shard / ep. Dense weights are sharded over all of dp_shard; routed experts are split
over ep and sharded over dp_shard_mod_ep.

Context parallelism (`cp`) is carved from dp_shard too: groups of cp consecutive ranks share
the rows of a batch (parallel/context.py). FSDP still shards over every rank of dp_shard, so cp
costs no extra weight memory; the ranks that load distinct data are world_size / cp.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh


@dataclass
class Distributed:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """`t` reduced over all ranks (op: sum | max), as a new tensor on t's device; the data
        travels on the training device, since NCCL reduces only there. A world of one returns t."""
        ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}
        if op not in ops:
            raise ValueError(f"all_reduce op={op!r} is not one of {', '.join(ops)}")
        if not dist.is_initialized():
            return t
        on_device = t.to(self.device, copy=True)
        dist.all_reduce(on_device, op=ops[op])
        return on_device.to(t.device)

    def barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()


def init_distributed(device: str = "auto", backend: str = "auto", timeout_s: int = 600) -> Distributed:
    """Join the torchrun job if there is one; a plain `python` run is a world of one."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is visible; use train.device=cpu or auto")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device(device, local_rank) if device == "cuda" else torch.device("cpu")
    if device == "cuda":
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        if backend == "auto":
            backend = "nccl" if device == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s),
                                device_id=dev if device == "cuda" else None)
    return Distributed(rank, world_size, local_rank, dev)


def mesh_shape(world_size: int, dp_shard: int, dp_replicate: int, ep: int, n_experts: int,
               cp: int = 1) -> tuple[int, int, int]:
    """(dp_replicate, dp_shard_mod_ep, ep) for this world size; raises naming the bad value."""
    if dp_replicate < 1:
        raise ValueError(f"parallel.dp_replicate={dp_replicate} must be >= 1")
    if dp_shard != -1 and dp_shard < 1:
        raise ValueError(f"parallel.dp_shard={dp_shard} must be >= 1, or -1 for world size / dp_replicate")
    if dp_shard == -1:
        if world_size % dp_replicate:
            raise ValueError(f"parallel.dp_replicate={dp_replicate} does not divide the world size {world_size}")
        dp_shard = world_size // dp_replicate
    if dp_replicate * dp_shard != world_size:
        raise ValueError(
            f"parallel.dp_replicate={dp_replicate} x parallel.dp_shard={dp_shard} = {dp_replicate * dp_shard} "
            f"ranks, but the job has {world_size}; make the product equal the world size or set dp_shard=-1"
        )
    if ep < 1 or dp_shard % ep:
        raise ValueError(f"parallel.ep={ep} must divide the data-parallel shard size {dp_shard} (world size "
                         f"{world_size} / dp_replicate {dp_replicate})")
    if ep > 1 and (n_experts <= 0 or n_experts % ep):
        raise ValueError(f"parallel.ep={ep} must divide the number of experts model.n_experts={n_experts}")
    if cp < 1 or dp_shard % cp:
        raise ValueError(f"parallel.cp={cp} must divide the data-parallel shard size {dp_shard} (world size "
                         f"{world_size} / dp_replicate {dp_replicate}): cp ranks share each row of a batch")
    return dp_replicate, dp_shard // ep, ep


@dataclass
class Meshes:
    """`dense`: the mesh FSDP shards dense weights over (1-D dp_shard, or 2-D dp_replicate x
    dp_shard for HSDP). `experts`: dp_replicate x dp_shard_mod_ep x ep, used by expert
    parallelism. Both order ranks the same way (row-major)."""

    dense: DeviceMesh
    experts: DeviceMesh | None
    shape: tuple[int, int, int]
    cp: DeviceMesh | None = None  # (dp, cp): groups of cp consecutive ranks that share rows


def build_mesh(env: Distributed, dp_shard: int, dp_replicate: int, ep: int, n_experts: int,
               cp: int = 1) -> Meshes | None:
    """The meshes for this job, or None for a single process (nothing to shard)."""
    shape = mesh_shape(env.world_size, dp_shard, dp_replicate, ep, n_experts, cp)
    if env.world_size == 1:
        return None
    dp_rep, shard_mod_ep, ep = shape
    if dp_rep == 1:
        dense = init_device_mesh(env.device.type, (shard_mod_ep * ep,), mesh_dim_names=("dp_shard",))
    else:
        dense = init_device_mesh(env.device.type, (dp_rep, shard_mod_ep * ep), mesh_dim_names=("dp_replicate", "dp_shard"))
    experts = None
    if ep > 1:
        experts = init_device_mesh(env.device.type, shape, mesh_dim_names=("dp_replicate", "dp_shard_mod_ep", "ep"))
        # Expert gradients are DTensors over dp_shard_mod_ep x ep: with the two dimensions also
        # available as one, their norm is a single all-reduce, bitwise the same on every rank.
        experts["dp_shard_mod_ep", "ep"]._flatten("dp_shard_in_ep")
    cp_mesh = None
    if cp > 1:
        cp_mesh = init_device_mesh(env.device.type, (env.world_size // cp, cp), mesh_dim_names=("dp", "cp"))["cp"]
    return Meshes(dense, experts, shape, cp_mesh)
