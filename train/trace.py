"""One training step of the real code at a planned world size, in this one process: what
launch/plan.py's `plan.trace=true` prints beside the estimate of train/memory.py and
train/cost.py.

torch's fake process group stands in for the N ranks (every collective returns at once, with
nothing moved); the model is built on the meta device and wrapped by herd's own
parallelisation (parallel/: FSDP2 over dp_shard, expert parallelism over ep, activation
checkpointing); then one forward and backward runs under fake tensors, which have shapes and no
data. Counted, for rank 0:
- the bytes of its parameter shards (from the wrapped model's local shapes), and with them the
  fp32 parameters, gradients and AdamW moments it keeps;
- FLOPs (torch.utils.flop_counter's formulas, recomputation included);
- the bytes of every FSDP all-gather and reduce-scatter and every expert all-to-all, counted at
  the calls (`count_collectives`), as tests/train/test_memory.py counts them in a real run.
Routing has no data under fake tensors, so the expert dispatch sends rows evenly (the
estimate's assumption too). The step is the trainer's: train/loss.py's compute_loss (an empty
image batch when the model has a vision encoder, as every text-only step gets) and backward.
Memory at its peak comes from torch's FSDPMemTracker, by its categories, plus AdamW's moments.
Not traced: context parallelism (cp > 1).
"""
from __future__ import annotations

import contextlib
import inspect
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from model import ModelArgs
from model.moe import GroupedExperts

from .memory import Layout

COLLECTIVES = ("fsdp all-gather", "fsdp reduce-scatter", "ep all-to-all")


@dataclass
class Trace:
    world_size: int
    param_bytes: int  # this rank's parameter shards, fp32
    flops: float  # per micro-batch, this rank
    bytes: dict[str, int] = field(default_factory=dict)  # per micro-batch, this rank, by collective
    seconds: float = 0.0
    # torch's FSDPMemTracker at the peak of forward and backward, by its categories (sharded and
    # unsharded parameters and gradients, activations, temporaries, collective buffers), plus
    # AdamW's moments ("opt", counted: resident from the first step on); empty for one rank
    # (no FSDP to track)
    peak: dict[str, int] = field(default_factory=dict)

    @property
    def sharded_state(self) -> int:
        """fp32 parameters, gradients and two AdamW moments: 4 x the parameter shards."""
        return 4 * self.param_bytes


@contextlib.contextmanager
def count_collectives(rank: int):
    """Within the block, bytes this rank sends or receives, by collective (a dict filled in
    place): an all-gather brings the other ranks' shards (output - input), a reduce-scatter sends
    all but this rank's part (input - output), an expert all-to-all sends the rows bound for other
    ranks (`rank` is this rank's index in its ep group). Wraps the torch.distributed functions
    FSDP2 calls (torch 2.13: the *_single forms; a call that makes another counts once) and
    parallel.expert's all-to-all."""
    from parallel import expert

    counted = dict.fromkeys(COLLECTIVES, 0)
    inside = []

    def counting(kind, fn, sign):
        names = list(inspect.signature(fn).parameters)

        def call(*args, **kwargs):
            named = {**dict(zip(names, args)), **kwargs}
            out, inp = (named[n] for n in names[:2])
            if not inside:
                counted[kind] += sign * (out.numel() - inp.numel()) * out.element_size()
            inside.append(kind)
            try:
                return fn(*args, **kwargs)
            finally:
                inside.pop()
        return call

    patched = {name: getattr(dist, name) for name in ("all_gather_single", "all_gather_into_tensor",
                                                      "reduce_scatter_single", "reduce_scatter_tensor")
               if hasattr(dist, name)}
    all_to_all = expert._all_to_all_start

    def counting_all_to_all(x, recv, send, group):
        if x.is_floating_point() and sum(send):  # the token rows; not the per-expert counts
            counted["ep all-to-all"] += (sum(send) - send[rank]) * x[0].numel() * x.element_size()
        return all_to_all(x, recv, send, group)

    for name, fn in patched.items():
        gather = name.startswith("all_gather")
        setattr(dist, name, counting("fsdp all-gather" if gather else "fsdp reduce-scatter", fn, 1 if gather else -1))
    expert._all_to_all_start = counting_all_to_all
    try:
        yield counted
    finally:
        for name, fn in patched.items():
            setattr(dist, name, fn)
        expert._all_to_all_start = all_to_all


class _CountFlops(TorchDispatchMode):
    """FLOPs of the ops torch.utils.flop_counter has formulas for (matmuls; attention on the
    kernels it knows, not the CPU one), without FlopCounterMode's module tracking: its backward
    hooks on the recomputation of checkpointed blocks kept that recomputation's tensors alive to
    the end of backward (a traced Scout's peak grew by 1.3 GiB a layer at 8,192 tokens, where a
    real run frees them)."""

    def __init__(self):
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.flops += formula(*args, **kwargs, out_val=out)
        return out


def _shape_only_grouped_mm(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """grouped_mm's shapes and FLOPs (2 x rows x K x N, and the same backward) without its
    row counts: every row through the first expert's matrix."""
    return x @ w[0]


def _no_image_rows(h: torch.Tensor, tokens: torch.Tensor, features: torch.Tensor, patch_token_id: int):
    """scatter_image_features for a batch with no image (features of zero rows): h, with the
    encoder still in the graph so its parameters get their (zero) gradient, as in a real step."""
    return h + features.sum().to(h.dtype) * 0


def trace_step(args: ModelArgs, layout: Layout, parallel) -> Trace:
    """Rank 0's view of one micro-batch of `layout` (its world size, dp_shard, ep, batch and
    seq_len, param dtype, activation checkpointing); `parallel` is the config's parallel group
    (for the rest of parallelize_model's settings).

    It runs in a forked child process: a fake process group leaves state behind in the process
    that made it, even once destroyed; a real 2-rank job forked from that process afterwards
    checkpointed only one rank's shards of every tensor."""
    import multiprocessing as mp
    import pickle
    import traceback

    if layout.cp > 1:
        raise ValueError("plan.trace does not trace context parallelism (parallel.cp > 1); the estimate stands")
    if dist.is_initialized():
        raise RuntimeError("plan.trace makes its own fake process group; this process already has one")
    receive, send = mp.get_context("fork").Pipe(duplex=False)

    def child() -> None:
        try:
            result = ("ok", _trace_step(args, layout, parallel))
        except BaseException:  # noqa: BLE001 - the parent raises it with the child's traceback
            result = ("error", traceback.format_exc())
        send.send_bytes(pickle.dumps(result))

    proc = mp.get_context("fork").Process(target=child)
    proc.start()
    send.close()
    try:
        status, value = pickle.loads(receive.recv_bytes())
    except EOFError:
        status, value = "error", "the trace's process died without a result"
    proc.join()
    if status != "ok":
        raise RuntimeError(f"plan.trace failed:\n{value}")
    return value


def _trace_step(args: ModelArgs, layout: Layout, parallel) -> Trace:
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.testing._internal.distributed.fake_pg import FakeStore

    import model.transformer
    from parallel import build_mesh
    from parallel.fsdp import parallelize_model
    from parallel.mesh import Distributed

    from .build import build_model
    from .loss import compute_loss

    # This runs in a child process of its own, so module functions can be swapped freely: a
    # text-only batch puts no image rows in the sequence, and counting the <|patch|> slots to
    # check that needs data.
    model.transformer.scatter_image_features = _no_image_rows
    start = time.monotonic()
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=layout.world_size)
    try:
        env = Distributed(0, layout.world_size, 0, torch.device("cpu"))
        meshes = build_mesh(env, layout.dp_shard, layout.world_size // layout.dp_shard, layout.ep, args.n_experts)
        with torch.device("meta"):
            model = build_model(args, 0)
        model = parallelize_model(model, meshes, param_dtype="bfloat16" if layout.param_bytes == 2 else "float32",
                                  reduce_dtype="float32", activation_checkpointing=layout.activation_checkpointing,
                                  replay_exchanges=layout.replay_exchanges,
                                  compile=False, device_type="cpu", fp8=parallel.fp8)
        for module in model.modules():  # fake tensors carry no per-expert row counts to group by
            if isinstance(module, GroupedExperts):
                module.grouped_mm = _shape_only_grouped_mm
        param_bytes = sum((p.to_local() if hasattr(p, "to_local") else p).numel() * 4 for p in model.parameters())
        with FakeTensorMode(allow_non_fake_inputs=True):
            model.to_empty(device="cpu")
            tokens = torch.zeros(layout.batch_size, layout.seq_len, dtype=torch.long)
            tracker = contextlib.nullcontext()
            if meshes is not None:
                from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker

                tracker = FSDPMemTracker(model)
                tracker.track_inputs((tokens,))
            ep_rank = 0  # rank 0 is the first of its ep group
            batch = {"tokens": tokens, "labels": torch.zeros_like(tokens)}
            with tracker, count_collectives(ep_rank) as counted, _CountFlops() as flops:
                out = compute_loss(model, batch, args, global_targets=float(tokens.numel() * layout.world_size),
                                   world_size=layout.world_size,
                                   autocast_dtype=torch.bfloat16 if layout.activation_bytes == 2 else None)
                out.loss.backward()
            peak = {}
            if meshes is not None:
                snapshot = next(iter(tracker.get_tracker_snapshot("peak").values()))
                peak = {str(k).split(".")[-1].lower(): int(v) for k, v in snapshot.items()}
                # AdamW's two fp32 moments per parameter shard are resident from the first step
                # on. Counted here, not tracked: the tracker's optimizer-step figures did not
                # match a run's (10x the moments for a 4-layer Scout).
                peak["opt"] = 2 * param_bytes
                peak["total"] = sum(v for k, v in peak.items() if k != "total")
        return Trace(layout.world_size, param_bytes, float(flops.flops),
                     {k: v for k, v in counted.items() if v}, time.monotonic() - start, peak)
    finally:
        dist.destroy_process_group()
