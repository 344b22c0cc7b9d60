"""Expert parallelism: routed experts split over the `ep` mesh dimension, and a dropless
all-to-all token dispatcher for the MoE layers.

Each rank of an ep group owns n_experts / ep consecutive experts (expert weights become
DTensors sharded on dim 0 over `ep`, so a state dict still holds full-size tensors and a
checkpoint loads under any ep). A MoE layer hands the dispatcher its routed rows sorted by
global expert id, and the dispatcher
  1. exchanges per-expert row counts (a small all-to-all), so every rank knows how many rows
     it sends to and receives from each peer: no capacity, no padding, no dropped token;
  2. sends the rows with a variable-size all-to-all, left in flight while the layer computes
     its shared expert;
  3. regroups what arrived from [source rank][local expert] to [local expert][source rank]
     order, so the local experts run as one grouped matmul;
and `combine` undoes 3 and 2. The backward pass mirrors this: the gradient's all-to-all is
also started asynchronously and waited for only when the gradient is needed. Under activation
checkpointing the recomputation reuses what the forward's exchanges received (see
`exchange_replay_contexts`) rather than exchanging again.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch._subclasses.fake_tensor import is_fake
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Shard, distribute_tensor

from model import MoE, TokenDispatcher


def _all_to_all_start(x: torch.Tensor, recv: list[int], send: list[int], group: str) -> torch.Tensor:
    """Launch an all-to-all (send[j] rows to rank j, recv[i] rows from rank i); the result
    must go through `_wait` before it is read."""
    return torch.ops._c10d_functional.all_to_all_single(x.contiguous(), recv, send, group)


def _wait(x: torch.Tensor) -> torch.Tensor:
    return torch.ops._c10d_functional.wait_tensor(x)


@dataclass
class _Exchange:
    """One all-to-all of rows between the ranks of an ep group."""

    send: list[int]
    recv: list[int]
    group: str
    replay: torch.Tensor | None = None  # rows kept from the forward: recomputation reuses them
    grad: torch.Tensor | None = None  # the input gradient's all-to-all, in flight during backward


class _SendRows(torch.autograd.Function):
    """Starts the all-to-all; its output is not ready until `_ReceiveRows`. In backward it waits
    for the gradient exchange that `_ReceiveRows.backward` started."""

    @staticmethod
    def forward(ctx, x, ex: _Exchange):
        ctx.ex = ex
        if ex.replay is not None:
            return ex.replay.view_as(ex.replay)
        return _all_to_all_start(x, ex.recv, ex.send, ex.group)

    @staticmethod
    def backward(ctx, _placeholder):
        grad, ctx.ex.grad = _wait(ctx.ex.grad), None
        return grad, None


class _ReceiveRows(torch.autograd.Function):
    """Waits for the all-to-all. In backward it starts the reverse exchange of the gradient and
    returns at once, so the autograd engine computes other gradients (the shared expert's)
    while the rows travel; `_SendRows.backward` collects them."""

    @staticmethod
    def forward(ctx, y, ex: _Exchange):
        ctx.ex = ex
        return (y if ex.replay is not None else _wait(y)).view_as(y)

    @staticmethod
    def backward(ctx, grad):
        ctx.ex.grad = _all_to_all_start(grad, ctx.ex.send, ctx.ex.recv, ctx.ex.group)
        return grad, None  # a placeholder; the real gradient is in flight


@dataclass
class _Recorded:
    """What one exchange produced in a checkpointed forward, for its recomputation."""

    send: list[int]
    recv: list[int]
    recv_counts: torch.Tensor | None = None
    rows: torch.Tensor | None = None


def exchange_replay_contexts(dispatchers: list[AllToAllDispatcher]):
    """A `context_fn` for torch.utils.checkpoint that keeps the all-to-all outputs of a
    checkpointed block out of its recomputation: the forward records what each exchange
    received, the recomputation in backward replays it instead of exchanging tokens again.
    (Selective checkpointing's op policy cannot do this here: the experts' FSDP hooks run
    inside the block and do not repeat op for op in the recomputation.)"""

    def contexts():
        log: list[_Recorded] = []
        return _recording(dispatchers, log), _replaying(dispatchers, log)

    return contexts


@contextlib.contextmanager
def _recording(dispatchers, log):
    for d in dispatchers:
        d.record_to = log
    try:
        yield
    finally:
        for d in dispatchers:
            d.record_to = None


@contextlib.contextmanager
def _replaying(dispatchers, log):
    entries = iter(list(log))
    for d in dispatchers:
        d.replay_from = entries
    try:
        yield
    finally:
        for d in dispatchers:
            d.replay_from = None
        log.clear()  # one recomputation per forward; free the rows now


def _block_permutation(counts: torch.Tensor, total: int) -> torch.Tensor:
    """Row index that reorders `total` rows laid out in blocks [a][b] (counts[a, b] rows each,
    row-major) into blocks [b][a]. `total` is passed in to avoid a host sync."""
    a, b = counts.shape
    sizes = counts.flatten()
    start = torch.cumsum(sizes, 0) - sizes  # where each [a][b] block begins
    t_sizes = counts.t().flatten()
    t_start = torch.cumsum(t_sizes, 0) - t_sizes  # where it goes in [b][a] order
    shift = start.view(a, b).t().flatten() - t_start
    return torch.arange(total, device=counts.device) + torch.repeat_interleave(shift, t_sizes, output_size=total)


@dataclass
class _Handle:
    rows: torch.Tensor  # in flight, [source rank][local expert] order
    exchange: _Exchange
    recv_counts: torch.Tensor  # [ep, local experts]: rows from each source rank for each local expert
    record: _Recorded | None = None
    order: torch.Tensor | None = None  # [source][expert] -> [expert][source] row order


class AllToAllDispatcher(TokenDispatcher):
    """Dropless expert-parallel dispatch over one ep process group; see the module docstring."""

    def __init__(self, group: dist.ProcessGroup, n_experts: int):
        self.group_name = group.group_name
        self.ep = group.size()
        self.n_local_experts = n_experts // self.ep
        # Set by exchange_replay_contexts while a checkpointed block runs forward / recomputes.
        self.record_to: list[_Recorded] | None = None
        self.replay_from: Iterator[_Recorded] | None = None

    def _exchange(self, send: list[int], recv: list[int], recv_counts=None) -> tuple[_Exchange, _Recorded | None]:
        """The next exchange, and where to record what it receives (None: nowhere)."""
        if self.replay_from is not None:
            kept = next(self.replay_from)
            return _Exchange(kept.send, kept.recv, self.group_name, replay=kept.rows), None
        record = None
        if self.record_to is not None:
            record = _Recorded(send, recv, recv_counts)
            self.record_to.append(record)
        return _Exchange(send, recv, self.group_name), record

    def dispatch(self, tokens: torch.Tensor, counts: torch.Tensor) -> _Handle:
        ep, n_local = self.ep, self.n_local_experts
        if self.replay_from is not None:  # recomputation: the forward's counts and rows, no exchange
            kept = next(self.replay_from)
            ex = _Exchange(kept.send, kept.recv, self.group_name, replay=kept.rows)
            return _Handle(_SendRows.apply(tokens, ex), ex, kept.recv_counts)
        # 1. Row counts: recv_counts[i, l] = rows rank i sends for this rank's local expert l.
        recv_counts = _wait(_all_to_all_start(counts, [n_local] * ep, [n_local] * ep, self.group_name))
        recv_counts = recv_counts.view(ep, n_local)
        if is_fake(counts):  # a planned step (train/trace.py): no data to route by, rows go out evenly
            send = recv = [len(tokens) // ep + (j < len(tokens) % ep) for j in range(ep)]
        else:
            send, recv = torch.stack((counts.view(ep, n_local).sum(1), recv_counts.sum(1))).tolist()  # one host sync
        # 2. The rows themselves, left in flight.
        ex, record = self._exchange(send, recv, recv_counts)
        return _Handle(_SendRows.apply(tokens, ex), ex, recv_counts, record)

    def receive(self, handle: _Handle) -> tuple[torch.Tensor, torch.Tensor]:
        rows = _ReceiveRows.apply(handle.rows, handle.exchange)
        if handle.record is not None:
            handle.record.rows = rows.detach()
        local_counts = handle.recv_counts.sum(0)
        if self.n_local_experts == 1:
            return rows, local_counts  # already grouped by local expert
        # 3. Group by local expert for one grouped matmul.
        handle.order = _block_permutation(handle.recv_counts, sum(handle.exchange.recv))
        return rows[handle.order], local_counts

    def combine(self, out: torch.Tensor, handle: _Handle) -> torch.Tensor:
        if handle.order is not None:
            inverse = torch.empty_like(handle.order)
            inverse[handle.order] = torch.arange(handle.order.numel(), device=inverse.device)
            out = out[inverse]
        ex, record = self._exchange(handle.exchange.recv, handle.exchange.send)  # the reverse exchange
        back = _ReceiveRows.apply(_SendRows.apply(out, ex), ex)
        if record is not None:
            record.rows = back.detach()
        return back


def apply_expert_parallel(model: nn.Module, ep_mesh: DeviceMesh) -> None:
    """Split every MoE layer's routed experts over `ep_mesh` (DTensor, Shard(0) on the expert
    dim) and install the all-to-all dispatcher. Call before FSDP wraps the experts."""
    group = ep_mesh.get_group()
    for module in model.modules():
        if not isinstance(module, MoE):
            continue
        experts = module.experts
        for name, param in list(experts.named_parameters(recurse=False)):
            # Every rank built the same full weights: each keeps its slice, nothing is sent.
            sharded = distribute_tensor(param.data, ep_mesh, [Shard(0)], src_data_rank=None)
            experts.register_parameter(name, nn.Parameter(sharded, requires_grad=param.requires_grad))
        module.dispatcher = AllToAllDispatcher(group, module.n_experts)
