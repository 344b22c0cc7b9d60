"""MultimodalLoader: the iterable of packed batches one rank trains on, with exact resume.

Each rank runs `num_workers` independent streams (DataLoader worker processes, or all in this
process with in_process=True / num_workers=0) and takes whole batches from them round-robin,
the order torch's DataLoader keeps. Every batch carries its stream's state, so the loader knows
what has been *consumed* (not merely prefetched): state_dict() is exact at any batch boundary,
and a loader that loads it yields the very batches the uninterrupted one would have.

Batch dict:
  tokens, labels, positions, doc_ids  LongTensor [B, T] (see data/packing.py)
  images    float [N_tiles, 3, 336, 336], tiles in the order of their <|patch|> groups (row-major)
  skipped   {reason: count} over this rank's streams so far (see data/decode.py SKIP_REASONS)
  documents documents tokenized by this rank's streams so far
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import signal
import threading
from typing import Iterator

from torch.utils.data import DataLoader, IterableDataset, _utils, get_worker_info

from data.args import DataArgs
from data.shards import expand_shards
from data.stream import WorkerStream
from data.tokenizer import Tokenizer

STATE_VERSION = 1
# Signals that ask a run to stop (preemption, Ctrl-C, Slurm's --signal): the trainer handles
# them (train/faults.py), loader workers ignore them (_iter_processes).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2)


@contextlib.contextmanager
def _stop_signals_blocked():
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _stop_workers(batches, force: bool) -> None:
    """Shut a DataLoader iterator's workers down now. They ignore SIGTERM (see STOP_SIGNALS), so
    one stuck in I/O would survive DataLoader's own terminate() and, as a daemon, hang the
    interpreter's exit: whatever is still alive is killed. `force` kills first (a stall)."""
    workers = list(getattr(batches, "_workers", []))
    if force:
        if getattr(batches, "_worker_pids_set", False):  # DataLoader's SIGCHLD watch would call it a crash
            _utils.signal_handling._remove_worker_pids(id(batches))
            batches._worker_pids_set = False
        for w in workers:
            if w.is_alive():
                w.kill()
    shutdown = getattr(batches, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()
    for w in workers:
        if w.is_alive():
            w.kill()
            w.join(5)


def _ignore_stop_signals(worker_id: int) -> None:
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def resolve_urls(urls: str | list[str]) -> list[str]:
    """Expand a source's urls; "sample" is the embedded sample set, built on first use."""
    if urls == "sample":
        from data.sample import default_sample_dir, ensure_sample

        urls = str(ensure_sample(default_sample_dir()))
    return expand_shards(urls)


def _make_stream(spec: dict, worker: int, state: dict | None) -> WorkerStream:
    args: DataArgs = spec["args"]
    tok = Tokenizer.load(args.tokenizer, args.num_special_tokens)
    stream = WorkerStream(
        args,
        spec["urls"],
        spec["rank"],
        spec["world_size"],
        worker,
        spec["num_streams"],
        spec["batch_size"],
        spec["seq_len"],
        spec["seed"],
        tok,
    )
    if state is not None:
        stream.load_state_dict(state)
    return stream


class DataStall(RuntimeError):
    """The data source of this rank produced nothing for longer than the loader's timeout."""


class _StreamsDataset(IterableDataset):
    """What a DataLoader worker process runs: logical stream (process id + first) % n."""

    def __init__(self, spec: dict, states: list, first: int):
        self.spec, self.states, self.first = spec, states, first

    def __iter__(self):
        info = get_worker_info()
        worker = ((info.id if info else 0) + self.first) % self.spec["num_streams"]
        for batch, state in _make_stream(self.spec, worker, self.states[worker]):
            batch["_worker"], batch["_state"] = worker, state
            yield batch


class MultimodalLoader:
    def __init__(
        self,
        args: DataArgs,
        rank: int = 0,
        world_size: int = 1,
        batch_size: int = 1,
        seq_len: int = 2048,
        seed: int = 0,
        num_workers: int = 0,
        in_process: bool = False,
        pin_memory: bool = False,
        prefetch_factor: int = 2,
        timeout_s: float = 0,
    ):
        args.validate()
        if not 0 <= rank < world_size:
            raise ValueError(f"data: rank={rank} is outside world_size={world_size}")
        if num_workers < 0:
            raise ValueError(f"data: num_workers={num_workers} must be >= 0")
        self.args, self.rank, self.world_size = args, rank, world_size
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.num_workers, self.in_process = num_workers, in_process or num_workers == 0
        self.pin_memory, self.prefetch_factor = pin_memory, prefetch_factor
        self.timeout_s = timeout_s  # worker processes: a batch that takes longer is a DataStall (0: wait forever)
        self.num_streams = max(1, num_workers)
        self.tokenizer = Tokenizer.load(args.tokenizer, args.num_special_tokens)
        self.urls = [resolve_urls(s.urls) for s in args.resolved_sources()]
        self._spec = {
            "args": args,
            "urls": self.urls,
            "rank": rank,
            "world_size": world_size,
            "num_streams": self.num_streams,
            "batch_size": batch_size,
            "seq_len": seq_len,
            "seed": seed,
        }
        self._states: list[dict | None] = [None] * self.num_streams
        self._counters: list[dict] = [{} for _ in range(self.num_streams)]
        self._documents = [0] * self.num_streams
        self._done = [False] * self.num_streams
        self._next = 0  # the stream whose batch comes next

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    # -- iteration -------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict]:
        """Batches from the current position on (a fresh iterator resumes where the last stopped)."""
        return self._iter_in_process() if self.in_process else self._iter_processes()

    def _iter_in_process(self) -> Iterator[dict]:
        streams = [None] * self.num_streams
        while not all(self._done):
            w = self._next
            if self._done[w]:
                self._next = (w + 1) % self.num_streams
                continue
            if streams[w] is None:
                streams[w] = iter(_make_stream(self._spec, w, self._states[w]))
            batch, state = next(streams[w])
            if self._consume(w, batch, state):
                yield batch

    def _iter_processes(self) -> Iterator[dict]:
        if all(self._done):
            return
        dataset = _StreamsDataset(self._spec, copy.deepcopy(self._states), self._next)
        loader = DataLoader(
            dataset,
            batch_size=None,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            prefetch_factor=self.prefetch_factor,
            persistent_workers=False,
            worker_init_fn=_ignore_stop_signals,
            timeout=self.timeout_s,
        )
        # Workers start with the stop signals blocked and then ignore them, so a signal sent to
        # the whole process group (torchrun's shutdown, Ctrl-C, Slurm's --signal) is left to the
        # training process, which stops at a step boundary and shuts its workers down itself.
        with _stop_signals_blocked():
            batches = iter(loader)
        stalled = False
        try:
            while True:
                try:
                    batch = next(batches)
                except StopIteration:
                    return
                except RuntimeError as e:
                    if "timed out" not in str(e):
                        raise
                    stalled = True
                    raise DataStall(f"rank {self.rank}: no batch from the data loader's workers in "
                                    f"{self.timeout_s:g} s (shards: {self._describe_sources()}); a source may be "
                                    "hanging (a slow pipe: command, a stalled filesystem)") from None
                w = batch.pop("_worker")
                if self._consume(w, batch, batch.pop("_state")):
                    yield batch
        finally:
            _stop_workers(batches, force=stalled)

    def _describe_sources(self) -> str:
        return "; ".join(f"{len(u)} from {u[0]!r}" for u in self.urls)

    def _consume(self, w: int, batch: dict, state: dict) -> bool:
        """Record what stream w handed over; True if it is a batch to yield (not an end marker)."""
        self._states[w] = state
        self._counters[w] = {k: int(v) for k, v in batch.pop("skipped").items()}
        self._documents[w] = int(batch.pop("documents"))
        self._next = (w + 1) % self.num_streams
        if batch.pop("_done", False):
            self._done[w] = True  # the round-robin skips it from now on, as DataLoader does
            return False
        batch["skipped"] = self.skipped
        batch["documents"] = self.documents
        return True

    @property
    def documents(self) -> int:
        """Documents tokenized so far by this rank's streams."""
        return sum(self._documents)

    @property
    def skipped(self) -> dict[str, int]:
        """Bad samples skipped so far by this rank's streams, by reason."""
        total: dict[str, int] = {}
        for c in self._counters:
            for k, v in c.items():
                total[k] = total.get(k, 0) + v
        return total

    # -- resume ----------------------------------------------------------------------------
    def _fingerprint(self) -> dict:
        """The settings a saved state must match. Source urls are kept as a digest: a url may hold
        a credential (a pipe: command's token), and checkpoints are plain JSON."""
        args = self.args.fingerprint()
        args["sources"] = hashlib.sha256(json.dumps(args["sources"]).encode()).hexdigest()
        return {
            "rank": self.rank,
            "world_size": self.world_size,
            "num_streams": self.num_streams,
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "seed": self.seed,
            "args": args,
            "shards": [len(u) for u in self.urls],
        }

    def state_dict(self) -> dict:
        """Plain python (JSON-serialisable) state of what has been consumed."""
        return copy.deepcopy(
            {
                "version": STATE_VERSION,
                "fingerprint": self._fingerprint(),
                "next": self._next,
                "states": self._states,
                "counters": self._counters,
                "documents": self._documents,
                "done": self._done,
            }
        )

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"data state version {state.get('version')!r} is not {STATE_VERSION}")
        mine, theirs = self._fingerprint(), state["fingerprint"]
        for key in mine:
            if mine[key] != theirs.get(key):
                raise ValueError(
                    f"data state was saved with {key}={theirs.get(key)!r} but this loader has {mine[key]!r}; "
                    f"resume with the same data settings, or start the data stream fresh"
                )
        state = copy.deepcopy(state)
        self._next, self._states = int(state["next"]), state["states"]
        self._counters, self._documents, self._done = state["counters"], state["documents"], state["done"]
