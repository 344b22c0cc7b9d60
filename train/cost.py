"""What a training step costs on a cluster: FLOPs per GPU, bytes per collective and a predicted
step time, from the config and a stated model of the hardware; and the search over the layouts
herd supports that launch/plan.py prints.

The model of a step (one GPU's view, per optimizer step):
- compute: train/metrics.flops_per_token x the GPU's tokens, at `GEMM_EFFICIENCY` of the GPU's
  dense bf16 peak (x 1.15 for recomputation with activation checkpointing);
- FSDP: each block's weights all-gathered in forward and again in backward (param dtype), the
  root's (embeddings, output, final norm, vision encoder) once, as they stay gathered from
  forward to backward; gradients reduce-scattered (reduce dtype, fp32); each moving (n - 1) / n
  of its unit; routed experts only among the dp_shard / ep ranks that hold the same 1 / ep of
  them;
- expert parallelism: routed tokens (top_k x dim) all-to-all to their expert and back, in
  forward and backward (4 exchanges a MoE layer; 6 when a checkpointed block's recomputation
  exchanges again, parallel.replay_exchanges=false), (ep - 1) / ep of them leaving the GPU;
- context parallelism: per layer, the K/V a rank receives (at most the all-gather's
  (cp - 1) / cp x seq_len tokens of 2 x kv_heads x head_dim on global layers, a halo on chunked
  ones), twice (the gradient goes back);
- HSDP (dp_replicate > 1): shards within dp_shard ranks, and each shard's gradient all-reduced
  across the replicas over the network once a micro-batch;
- links: a collective inside one node (its ranks consecutive and at most `gpus_per_node`) runs
  at NVLink speed, else at the GPU's InfiniBand share; FSDP traffic overlaps compute up to
  `FSDP_OVERLAP` of the compute time; EP and CP exchanges are on the critical path.
The figures are estimates to rank layouts and to see what dominates, not measurements.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from model import ModelArgs, Transformer
from model.params import count_parameters

from .memory import GPUS, Layout, estimate_memory, fsdp_sizes
from .metrics import flops_per_token

GEMM_EFFICIENCY = 0.55  # of the dense bf16 peak that large MoE steps reach (torchtitan reports 33-45% MFU)
FSDP_OVERLAP = 0.8  # of compute time that hides FSDP's all-gathers and reduce-scatters


@dataclass(frozen=True)
class GPU:
    memory: int  # bytes
    bf16_flops: float  # dense peak, FLOP/s
    nvlink: float  # bytes/s per direction per GPU
    network: float  # bytes/s per GPU across nodes


SPECS = {  # datasheet figures (SXM parts, dense); network: one 400 Gb/s NIC per GPU
    "h100": GPU(GPUS["h100"], 989e12, 450e9, 50e9),
    "h200": GPU(GPUS["h200"], 989e12, 450e9, 50e9),
    "b200": GPU(GPUS["b200"], 2250e12, 900e9, 50e9),
}


@dataclass
class StepCost:
    layout: Layout
    flops: float  # per GPU per micro-batch
    bytes: dict[str, float]  # per GPU per micro-batch, by collective
    compute_s: float
    comm_s: float
    step_s: float
    memory: int

    @property
    def tokens_per_s(self) -> float:  # per GPU
        return self.layout.batch_size * self.layout.seq_len / self.layout.cp / self.step_s

    @property
    def mfu(self) -> float:
        return self.flops / self.step_s / self._peak

    _peak: float = 0.0


_ACTIVE: dict[str, int] = {}


def _active_no_embedding(args: ModelArgs) -> int:
    key = repr(args)
    if key not in _ACTIVE:
        with torch.device("meta"):
            counts = count_parameters(Transformer(args))
        _ACTIVE[key] = sum(a for c, (_, a) in counts.items() if c != "embedding")
    return _ACTIVE[key]


def matmul_flops(args: ModelArgs, layout: Layout) -> float:
    """The matmul part of a micro-batch's FLOPs per GPU (6 x active parameters without the
    embedding, per token), with activation checkpointing's second forward: what a traced step
    (train/trace.py) counts, attention scores aside."""
    tokens = layout.batch_size * layout.seq_len // layout.cp
    return 6 * _active_no_embedding(args) * tokens * (4 / 3 if layout.activation_checkpointing else 1)


def step_cost(args: ModelArgs, layout: Layout, gpu: str, gpus_per_node: int = 8) -> StepCost:
    spec = SPECS[gpu]
    tokens = layout.batch_size * layout.seq_len // layout.cp
    flops = flops_per_token(args, layout.seq_len, _active_no_embedding(args)) * tokens
    if layout.activation_checkpointing:
        flops_done = flops * (1 + 1 / 3)  # the forward again: a third of forward + backward
    else:
        flops_done = flops
    compute_s = flops_done / (spec.bf16_flops * GEMM_EFFICIENCY)

    link = lambda group: spec.nvlink if group <= gpus_per_node else spec.network  # noqa: E731
    memory = estimate_memory(args, layout, "cuda")
    n = layout.dp_shard
    # Dense weights are gathered from all dp_shard ranks; a rank's experts (1/ep of them) only
    # from the dp_shard / ep ranks that shard them, with FSDP2's padding (train/memory.FsdpSizes).
    # Blocks reshard after forward and are gathered again for backward; the root unit is not.
    sizes = fsdp_sizes(args, n, layout.ep)
    gathers = (2 * sizes.received_blocks + sizes.received_root) * layout.param_bytes
    reduces = (sizes.received_blocks + sizes.received_root) * 4
    out = {"fsdp all-gather": gathers, "fsdp reduce-scatter": reduces}
    moe_layers = sum(args.is_moe_layer(i) for i in range(args.n_layers))
    if layout.ep > 1 and moe_layers:
        # two exchanges forward and two backward, and two more when a checkpointed block's
        # recomputation exchanges again instead of replaying (parallel.replay_exchanges=false)
        exchanges = 6 if layout.activation_checkpointing and not layout.replay_exchanges else 4
        out["ep all-to-all"] = (exchanges * moe_layers * tokens * args.top_k * args.dim * layout.activation_bytes
                                * (layout.ep - 1) / layout.ep)
    if layout.cp > 1:
        global_layers = sum(args.is_nope_layer(i) for i in range(args.n_layers))
        kv = 2 * args.n_kv_heads * args.head_size * layout.activation_bytes
        halo = (args.attention_chunk_size or 0) * 2
        out["cp k/v exchange"] = 2 * layout.batch_size * kv * (
            global_layers * layout.seq_len * (layout.cp - 1) / layout.cp + (args.n_layers - global_layers) * halo)
    fsdp_s = (gathers + reduces) / link(n)
    replicas = layout.world_size // layout.dp_shard
    if replicas > 1:  # HSDP: each shard's gradient all-reduced across the replicas (ring: 2 (r-1)/r)
        out["hsdp all-reduce"] = 2 * sizes.shard * 4 * (replicas - 1) / replicas
        fsdp_s += out["hsdp all-reduce"] / spec.network
    exposed = max(0.0, fsdp_s - FSDP_OVERLAP * compute_s)
    other_s = out.get("ep all-to-all", 0) / link(layout.ep) + out.get("cp k/v exchange", 0) / link(layout.cp)
    step_s = compute_s + exposed + other_s
    cost = StepCost(layout, flops, out, compute_s, fsdp_s + other_s, step_s, memory.total)
    cost._peak = spec.bf16_flops
    return cost


def search_layouts(args: ModelArgs, base: Layout, gpu: str, gpus_per_node: int = 8) -> list[StepCost]:
    """Every layout herd supports at this world size (ep dividing the experts and the FSDP size,
    cp for long rows, activation checkpointing on or off, and with it and ep > 1 the all-to-all
    rows replayed or exchanged again) that fits a GPU, fastest first."""
    world = base.world_size
    # FSDP over all GPUs, or HSDP: shard within groups of a power of two from one node up.
    shards = sorted({world} | {s for s in (2**k * gpus_per_node for k in range(32)) if s < world and world % s == 0})
    fits = []
    for dp_shard in shards:
        eps = [e for e in range(1, dp_shard + 1) if dp_shard % e == 0 and (e == 1 or args.n_experts % e == 0)]
        cps = [c for c in (1, 2, 4, 8, 16, 32) if dp_shard % c == 0 and base.seq_len % (2 * c) == 0
               and (c == 1 or base.seq_len // c >= 4096)]
        for ep in eps:
            for cp in cps:
                for ac, replay in ((False, True), (True, True), (True, False)):
                    if not replay and ep == 1:
                        continue  # nothing to replay
                    layout = replace(base, dp_shard=dp_shard, ep=ep, cp=cp, activation_checkpointing=ac,
                                     replay_exchanges=replay)
                    cost = step_cost(args, layout, gpu, gpus_per_node)
                    if cost.memory <= SPECS[gpu].memory:
                        fits.append(cost)
    return sorted(fits, key=lambda c: -c.tokens_per_s)
