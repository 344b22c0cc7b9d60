"""Turn a Transformer into a data-parallel one: FP8 matmuls, expert parallelism, activation
checkpointing, per-block torch.compile and FSDP2 (`fully_shard`) per block, applied from outside
the model, in that order: FP8 (parallel/fp8.py) changes which code runs the blocks' linears and
experts, so it comes before anything wraps them.

With parallel.ep > 1, routed experts are first split over `ep` (parallel/expert.py), then
FSDP-sharded over `dp_shard_mod_ep` (x `dp_replicate`); everything else is FSDP-sharded over all
of dp_shard as without EP.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import Shard

from model import MoE, Transformer

from .expert import AllToAllDispatcher, apply_expert_parallel, exchange_replay_contexts
from .fp8 import Fp8Config, apply_fp8
from .mesh import Meshes

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def parallelize_model(
    model: Transformer,
    meshes: Meshes | None,
    *,
    param_dtype: str = "auto",
    reduce_dtype: str = "float32",
    activation_checkpointing: bool = False,
    replay_exchanges: bool = True,
    compile: bool = False,
    device_type: str = "cpu",
    fp8: Fp8Config | None = None,
) -> Transformer:
    """`fp8`: the parallel.fp8 group (recipe, backend, all_gather); None or recipe none: no FP8.
    FSDP all-gathers the FP8 layers' weights in param_dtype unless fp8.all_gather is set."""
    if fp8 is not None:
        apply_fp8(model, fp8, device_type)
    expert_parallel = meshes is not None and meshes.experts is not None
    if expert_parallel:
        apply_expert_parallel(model, meshes.experts["ep"])
    for key, block in list(model.layers.items()):
        if activation_checkpointing:
            # With EP, the recomputation in backward reuses the forward's all-to-all outputs
            # instead of exchanging tokens again (unless replay_exchanges is off, which frees
            # that memory); everything else is recomputed as usual.
            dispatchers = [m.dispatcher for m in block.modules()
                           if isinstance(m, MoE) and isinstance(m.dispatcher, AllToAllDispatcher)]
            replay = {"context_fn": exchange_replay_contexts(dispatchers)} if dispatchers and replay_exchanges else {}
            block = checkpoint_wrapper(block, preserve_rng_state=False, **replay)
        if compile:
            block.compile()
        model.layers[key] = block
    if meshes is None:
        return model

    if param_dtype == "auto":
        param_dtype = "bfloat16" if device_type == "cuda" else "float32"
    mp = MixedPrecisionPolicy(param_dtype=_DTYPES[param_dtype], reduce_dtype=_DTYPES[reduce_dtype])
    dp_mesh = meshes.dense
    for block in model.layers.values():
        placement = None
        if isinstance(moe := unwrap_block(block).feed_forward, MoE):
            if expert_parallel:
                _shard_experts(moe, meshes, mp, device_type)
            else:
                routed = {id(p) for p in moe.experts.parameters()}
                on_dim1 = experts_on_dim1(moe.n_experts, dp_mesh.size(-1))  # the shard dim (HSDP: the last)
                placement = lambda p, routed=routed: on_dim1(p) if id(p) in routed else None  # noqa: E731
        fully_shard(block, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=True, shard_placement_fn=placement)
    # The root holds embeddings, final norm and output; it does not reshard after forward
    # because backward needs the output weight straight away.
    fully_shard(model, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=False)
    return model


def _shard_experts(moe: MoE, meshes: Meshes, mp: MixedPrecisionPolicy, device_type: str) -> None:
    """FSDP over the ranks that hold the same experts: dp_shard_mod_ep (x dp_replicate)."""
    dp_rep, shard_mod_ep, ep = meshes.shape
    mesh = meshes.experts["dp_replicate", "dp_shard_mod_ep"] if dp_rep > 1 else meshes.experts["dp_shard_mod_ep"]
    # EP already splits dim 0 (experts)
    placement = experts_on_dim1(moe.n_experts // ep, shard_mod_ep)
    fully_shard(moe.experts, mesh=mesh, mp_policy=mp, reshard_after_forward=True, shard_placement_fn=placement)
    # The loss is scaled for averaging over all dp ranks, and each rank's expert gradients
    # already hold the contributions of its whole ep group (they arrived by all-to-all).
    # Reducing over the dp_shard_mod_ep x dp_replicate ranks and dividing by the full dp size
    # therefore gives the same gradient as one process: not dividing by ep would overcount ep x.
    moe.experts.set_gradient_divide_factor(float(dp_rep * shard_mod_ep * ep))
    if device_type == "cpu" and shard_mod_ep > 1:
        # gloo has no pre-multiplied sum: reduce with a plain sum and divide after. (Not with a
        # single FSDP rank, where FSDP skips the reduce-scatter and already divides once.)
        moe.experts.set_force_sum_reduction_for_comms(True)


def experts_on_dim1(local_experts: int, ranks: int):
    """FSDP's `shard_placement_fn` for routed expert weights [experts, in, out]: FSDP pads the
    sharded dim to a multiple of the ranks, so 16 experts over 64 ranks on the expert dim would
    gather 64 experts' worth; with fewer experts than ranks, shard the next dim when the ranks
    divide it (FSDP shards other dims evenly only), else pad (train/memory.FsdpSizes counts it)."""
    if local_experts >= ranks:
        return lambda p: None
    return lambda p: Shard(1) if p.shape[1] % ranks == 0 else None


def unwrap_block(block: nn.Module) -> nn.Module:
    return getattr(block, "_checkpoint_wrapped_module", block)
