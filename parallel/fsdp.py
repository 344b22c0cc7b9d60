"""Turn a Transformer into a data-parallel one: activation checkpointing, per-block
torch.compile and FSDP2 (`fully_shard`) per block, applied from outside the model."""
from __future__ import annotations

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from model import Transformer

from .mesh import Meshes

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def parallelize_model(
    model: Transformer,
    meshes: Meshes | None,
    *,
    param_dtype: str = "auto",
    reduce_dtype: str = "float32",
    activation_checkpointing: bool = False,
    compile: bool = False,
    device_type: str = "cpu",
) -> Transformer:
    for key, block in list(model.layers.items()):
        if activation_checkpointing:
            block = checkpoint_wrapper(block, preserve_rng_state=False)
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
        fully_shard(block, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=True)
    # The root holds embeddings, final norm and output; it does not reshard after forward
    # because backward needs the output weight straight away.
    fully_shard(model, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=False)
    return model


def unwrap_block(block: nn.Module) -> nn.Module:
    return getattr(block, "_checkpoint_wrapped_module", block)
