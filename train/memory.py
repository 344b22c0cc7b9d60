"""What one rank will hold, estimated from the config alone (no weights, no process group): the
pre-flight check that stops a run which cannot fit before it builds anything, and the numbers
launch/plan.py prints.

Per rank, in bytes:
- sharded state: every parameter's fp32 value, fp32 gradient and two fp32 AdamW moments (16
  bytes), divided over the FSDP ranks (dp_shard; routed experts over ep x dp_shard_mod_ep, the
  same count), as FSDP2 divides them: each parameter on one dim, padded to a multiple of the
  ranks (`FsdpSizes`; it matters when a dim has fewer rows than there are ranks);
- gathered weights: the root unit (embeddings, output head, and the vision encoder, which is
  not wrapped on its own) stays gathered in parallel.param_dtype from forward to the end of
  backward; FSDP gathers a block's weights for its forward and again for its backward (two
  blocks in flight with prefetching), plus the block's unsharded fp32 gradient before its
  reduce-scatter; routed experts are gathered within their ep group only;
- the root's gradients: at the end of backward the root unit's unsharded gradients (in
  param_dtype) and the fp32 copy FSDP reduce-scatters them from are alive together;
- activations saved for backward: a per-token, per-layer count of the tensors herd's layers keep
  (module docstring of each layer; an estimate, not a trace), times the rank's tokens
  (batch_size x seq_len / cp), plus the loss's log-softmax over the vocabulary and two
  gradients of its size; with activation checkpointing only each block's input is kept (and,
  with expert parallelism, what its all-to-alls received), and one block is recomputed at a time;
- on a CPU host, models built whole (up to train.build.FULL_INIT_MAX_PARAMS) exist in full on
  every rank while they are initialised.

The peak is the largest of three moments (a traced step, train/trace.py, shows each): the loss's
backward (sharded state, root weights, activations, log-softmax), the start of the blocks'
backward (the log-softmax freed, blocks gathered instead) and the end of backward (sharded
state and the root's gradients, everything else freed).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from model import ModelArgs, Transformer

GiB = 2**30


@dataclass
class Layout:
    world_size: int
    dp_shard: int  # FSDP ranks (world size / dp_replicate)
    ep: int = 1
    cp: int = 1
    seq_len: int = 8192
    batch_size: int = 1  # rows per micro-batch per rank (per cp group with cp > 1)
    param_bytes: int = 2  # FSDP compute dtype: 2 for bfloat16, 4 for float32
    activation_bytes: int = 2  # 2 under bfloat16 autocast, 4 in float32
    activation_checkpointing: bool = False
    replay_exchanges: bool = True  # checkpointed MoE blocks keep their all-to-all rows (ep > 1)


@dataclass
class MemoryEstimate:
    sharded_state: int  # fp32 params + grads + AdamW moments, this rank's shard
    root_weights: int  # the root unit, gathered from forward to the end of backward
    block_weights: int  # two blocks gathered (prefetch) and one's unsharded fp32 gradient
    activations: int  # saved for backward
    logits: int  # the loss's log-softmax and its two gradients
    root_gradients: int  # the root unit's unsharded gradients and their fp32 reduce-scatter copy
    build: int  # CPU only: a model built whole before sharding
    parameters: int  # all parameters of the model

    @property
    def gathered_weights(self) -> int:
        return self.root_weights + self.block_weights

    @property
    def total(self) -> int:
        # At the loss's backward (log-softmax) or as the blocks' backward begins (blocks
        # gathered, log-softmax freed); at the end of backward (blocks and the root resharded,
        # activations freed); or a CPU build.
        during = self.sharded_state + self.root_weights + self.activations + max(self.logits, self.block_weights)
        return max(during, self.sharded_state + self.root_gradients, self.build)

    def table(self) -> str:
        rows = [("parameters, gradients, AdamW state (sharded)", self.sharded_state),
                ("root unit's weights (gathered all step)", self.root_weights),
                ("activations saved for backward", self.activations),
                ("+ at the loss: log-softmax and its gradients", self.logits),
                ("+ or then: 2 blocks gathered, one's gradient", self.block_weights),
                ("or, at the end of backward: the root's gradients", self.root_gradients),
                ("peak per rank", self.total)]
        return "\n".join(f"  {name:<48} {gib(value):>12}" for name, value in rows)


def gib(n: float) -> str:
    return f"{n / GiB:,.1f} GiB" if n >= GiB / 10 else f"{n / 2**20:,.1f} MiB"


_SHAPES: dict[str, list[tuple[str | None, bool, tuple[int, ...]]]] = {}


def parameter_shapes(args: ModelArgs) -> list[tuple[str | None, bool, tuple[int, ...]]]:
    """(its block, or None for the root unit; routed expert or not; shape) of every parameter,
    from a meta-device build, remembered per config (plans ask many times)."""
    key = repr(args)
    if key not in _SHAPES:
        with torch.device("meta"):
            model = Transformer(args)
        _SHAPES[key] = [(name.split(".")[1] if name.startswith("layers.") else None, ".experts." in f".{name}",
                         tuple(p.shape)) for name, p in model.named_parameters()]
    return _SHAPES[key]


@dataclass(frozen=True)
class FsdpSizes:
    """Elements on rank 0 under FSDP2, which shards each parameter on one dim over its group and
    pads that dim to a multiple of the group: a parameter of 1,024 rows over 32,768 ranks puts one
    row on each of the first 1,024 ranks and a row of padding on every other, and is gathered as
    32,768 rows. Rank 0 always holds a full chunk, so it is the rank that needs the most."""

    shard: int  # rank 0's shards of every parameter
    block: int  # the largest block gathered (its routed experts among their dp_shard / ep ranks)
    root: int  # the root unit gathered (embeddings, output head, final norm, vision encoder)
    received_blocks: int  # what gathering every block once brings rank 0 (gathered minus its own shards)
    received_root: int  # what gathering the root brings it


def fsdp_sizes(args: ModelArgs, dp_shard: int, ep: int) -> FsdpSizes:
    """`FsdpSizes` for FSDP over dp_shard ranks, routed experts split over ep of them first (Shard
    on the expert dim) and sharded over the dp_shard / ep that hold the same experts: on the expert
    dim when there are at least as many local experts, else on the next (parallel/fsdp.py). Other
    parameters are sharded on dim 0."""
    shard = root = received_root = 0
    blocks: dict[str, int] = {}
    received_blocks = 0
    for unit, expert, shape in parameter_shapes(args):
        k, dim = dp_shard, 0
        if expert:  # split over ep on the expert dim, then over the rest on it or, if fewer, the next
            shape = (shape[0] // ep, *shape[1:])
            k = dp_shard // ep
            dim = 0 if shape[0] >= k or shape[1] % k else 1  # parallel.fsdp.experts_on_dim1
        own = -(-shape[dim] // k) * (math.prod(shape) // shape[dim])  # ceil(rows / k) rows
        shard += own
        if unit is None:
            root += own * k
            received_root += own * (k - 1)
        else:
            blocks[unit] = blocks.get(unit, 0) + own * k
            received_blocks += own * (k - 1)
    return FsdpSizes(shard, max(blocks.values(), default=0), root, received_blocks, received_root)


def activation_elements_per_token(args: ModelArgs) -> int:
    """Elements one token keeps for backward across all decoder layers (no checkpointing)."""
    D, hd, H, Hkv = args.dim, args.head_size, args.n_heads, args.n_kv_heads
    # norm input, q/k/v and their gathered copies for segment attention, the output, its gathered
    # copy and wo's input
    attention = 2 * D + 2 * (H + 2 * Hkv) * hd + 3 * H * hd
    dense = 2 * D + 3 * args.ffn_hidden  # norm, w1 and w3 outputs, SwiGLU product
    shared = 3 * args.expert_hidden if args.shared_expert else 0
    moe = 2 * D + args.n_experts + args.top_k * (D + 3 * args.expert_hidden) + shared
    # RoPE layers' qk-norm keeps its input and output of q and k; NoPE layers' temperature
    # tuning keeps q before scaling
    qk_norm = 2 * (H + Hkv) * hd if args.use_qk_norm else 0
    temperature = H * hd if args.attn_temperature_tuning else 0
    return sum(attention + (temperature if args.is_nope_layer(i) else qk_norm)
               + (moe if args.is_moe_layer(i) else dense) for i in range(args.n_layers))


def estimate_memory(args: ModelArgs, layout: Layout, device_type: str = "cuda") -> MemoryEstimate:
    from .build import FULL_INIT_MAX_PARAMS

    n_params = sum(math.prod(shape) for _, _, shape in parameter_shapes(args))
    sizes = fsdp_sizes(args, layout.dp_shard, layout.ep)
    sharded = 16 * sizes.shard
    root_weights = block_weights = root_gradients = 0
    if layout.world_size > 1:
        root_weights = sizes.root * layout.param_bytes
        block_weights = sizes.block * (2 * layout.param_bytes + 4)
        root_gradients = sizes.root * (layout.param_bytes + 4)
    tokens = layout.batch_size * layout.seq_len // layout.cp
    per_token = activation_elements_per_token(args)
    if layout.activation_checkpointing:
        # Each block's input and one block recomputed at a time; with expert parallelism each MoE
        # block also keeps the rows its two all-to-alls received, which the recomputation replays
        # instead of exchanging again (parallel/expert.py), unless parallel.replay_exchanges is off.
        replayed = 2 * args.top_k * args.dim if layout.ep > 1 and layout.replay_exchanges else 0
        moe_layers = sum(args.is_moe_layer(i) for i in range(args.n_layers))
        per_token = args.n_layers * args.dim + moe_layers * replayed + per_token // args.n_layers
    activations = tokens * per_token * layout.activation_bytes
    # At the loss's backward, in fp32 whatever the compute dtype: the log-softmax it keeps, the
    # gradient that arrives at it and the one it passes to the logits (the logits themselves are
    # freed once the loss has its fp32 copy).
    logits = tokens * args.vocab_size * 12
    build = 4 * n_params if device_type == "cpu" and n_params <= FULL_INIT_MAX_PARAMS else 0
    return MemoryEstimate(sharded, root_weights, block_weights, activations, logits, root_gradients, build, n_params)


def device_memory(device_type: str) -> tuple[int, str]:
    """(bytes one rank may use, where the figure comes from) on this host."""
    if device_type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        _, total = torch.cuda.mem_get_info(local)
        return total, f"{torch.cuda.get_device_name(local)}, {gib(total)}"
    available = _meminfo("MemAvailable")
    ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return available // ranks, f"{gib(available)} available on this host / {ranks} local rank(s)"


def _meminfo(field: str) -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62  # unknown: do not refuse


def fsdp_ranks_needed(estimate: MemoryEstimate, layout: Layout, per_rank: int) -> int | None:
    """The smallest FSDP size at which the sharded state plus what does not shrink fits, or None."""
    fixed = estimate.total - estimate.sharded_state
    if fixed >= per_rank:
        return None
    return -(-(estimate.sharded_state * layout.dp_shard) // (per_rank - fixed))


# Memory per GPU from the datasheets (decimal gigabytes).
GPUS = {"h100": 80 * 10**9, "h200": 141 * 10**9, "b200": 192 * 10**9}


def layout_of(cfg, world_size: int, device_type: str, phase=None) -> Layout:
    """The Layout a composed config runs with at this world size (its first phase by default)."""
    from parallel import mesh_shape

    p, t = cfg.parallel, cfg.train
    args = model_args_of(cfg)
    _, shard_mod_ep, ep = mesh_shape(world_size, p.dp_shard, p.dp_replicate, p.ep, args.n_experts, p.cp)
    param_dtype = p.param_dtype if p.param_dtype != "auto" else ("bfloat16" if device_type == "cuda" else "float32")
    bf16 = t.dtype == "bfloat16" or (t.dtype == "auto" and device_type == "cuda")
    return Layout(world_size, shard_mod_ep * ep, ep, p.cp, phase.seq_len if phase else t.seq_len,
                  phase.batch_size if phase else t.batch_size,
                  (2 if param_dtype == "bfloat16" else 4) if world_size > 1 else 4, 2 if bf16 else 4,
                  p.activation_checkpointing, p.replay_exchanges)


def model_args_of(cfg) -> ModelArgs:
    from .config import model_args

    return model_args(cfg)


def preflight(cfg, phases, world_size: int, device_type: str) -> None:
    """Raise ValueError, with the estimate and what would fit, when a rank of this run cannot hold
    what it needs on this host's devices. Runs on the config alone, in about a second."""
    per_rank, where = device_memory(device_type)
    worst = None
    for phase in phases:
        layout = layout_of(cfg, world_size, device_type, phase)
        estimate = estimate_memory(phase.model, layout, device_type)
        if worst is None or estimate.total > worst[1].total:
            worst = (layout, estimate, phase)
    layout, estimate, phase = worst
    if estimate.total <= per_rank:
        return
    hints, best = [], (estimate, layout)
    if not layout.activation_checkpointing:
        checkpointed_layout = Layout(**{**vars(layout), "activation_checkpointing": True})
        checkpointed = estimate_memory(phase.model, checkpointed_layout, device_type)
        hints.append(f"parallel.activation_checkpointing=true (about {gib(checkpointed.total)} per rank)")
        best = (checkpointed, checkpointed_layout)
    elif layout.ep > 1 and layout.replay_exchanges:
        again_layout = Layout(**{**vars(layout), "replay_exchanges": False})
        again = estimate_memory(phase.model, again_layout, device_type)
        hints.append(f"parallel.replay_exchanges=false (about {gib(again.total)} per rank, 1.5x the all-to-all bytes)")
        best = (again, again_layout)
    needed = fsdp_ranks_needed(*best, per_rank)
    if needed is not None and needed > layout.dp_shard:
        hints.append(f"at least {needed} FSDP ranks of this memory for the sharded state")
    for name, size in GPUS.items():
        fit = fsdp_ranks_needed(*best, size)
        if device_type == "cpu" and fit and fit > 1:
            hints.append(f"a GPU cluster (about {fit} x {name}, checkpointed)")
            break
    if layout.batch_size > 1 or layout.seq_len > 2048:
        hints.append("a smaller train.batch_size or seq_len, or parallel.cp > 1 for long rows")
    phase_note = f" (phase {phase.name}: seq_len {phase.seq_len})" if len(phases) > 1 else ""
    raise ValueError(
        f"this run needs about {gib(estimate.total)} per rank{phase_note} but a rank has {gib(per_rank)} "
        f"({where}); the model has {estimate.parameters / 1e9:,.2f}B parameters, {world_size} rank(s):\n"
        f"{estimate.table()}\n"
        f"try: {'; '.join(hints) or 'more ranks'}. `python launch/plan.py +model=... plan.gpus=N` plans a cluster; "
        "train.preflight=false starts anyway")
