"""Build the model a run trains: on the meta device or whole, parallelised by parallel/, on its
device and initialised.

This is where a change to how parameters are created or wrapped goes: per-parameter init
scales (MetaP) in `Transformer.init_weights`'s place, module conversions (FP8) inside
`parallelize_model`, before FSDP wraps the blocks.
"""
from __future__ import annotations

import torch

from model import ModelArgs, Transformer
from parallel import Distributed, Meshes, parallelize_model

from . import metap

# Build the model on the meta device and initialise its shards in place when it would not fit
# comfortably in host memory on every rank; small models are built whole so that any layout
# starts from bitwise the same weights.
FULL_INIT_MAX_PARAMS = 2_000_000_000


def build_model(args: ModelArgs, seed: int, use_metap: bool = False) -> Transformer:
    """The model with initialised weights on the CPU, or on the meta device when it is large.
    `use_metap`: MetaP's init scales (train/metap.py)."""
    with torch.device("meta"):
        model = Transformer(args)
    n_params = sum(p.numel() for p in model.parameters())
    torch.manual_seed(seed)
    if n_params <= FULL_INIT_MAX_PARAMS:
        model = Transformer(args)
        init_weights(model, args, use_metap)
    return model


def init_weights(model: Transformer, args: ModelArgs, use_metap: bool) -> None:
    model.init_weights()
    if use_metap:
        metap.init_weights(model, args)


def build_parallel_model(args: ModelArgs, seed: int, parallel, env: Distributed, meshes: Meshes | None,
                         use_metap: bool = False) -> Transformer:
    """`build_model`, then parallel/'s wrapping (`parallel` is the config's parallel group), then
    the weights on the training device: moved there, or initialised shard by shard when the
    model was built on the meta device."""
    model = build_model(args, seed, use_metap)
    meta = next(model.parameters()).is_meta
    model = parallelize_model(model, meshes, param_dtype=parallel.param_dtype, reduce_dtype=parallel.reduce_dtype,
                              activation_checkpointing=parallel.activation_checkpointing,
                              replay_exchanges=parallel.replay_exchanges, compile=parallel.compile,
                              device_type=env.device.type, fp8=parallel.fp8)
    if meta:
        model.to_empty(device=env.device)
        init_weights(model, args, use_metap)
    else:
        model.to(env.device)
    return model
