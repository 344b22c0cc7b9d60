"""Shared test helpers: compose the real Hydra config, and run a function on N gloo ranks."""
from __future__ import annotations

import multiprocessing as mp
import multiprocessing.connection as mp_connection
import os
import pickle
import socket
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def compose(overrides: list[str]):
    """The config pretrain.py would get for these command-line overrides."""
    import hydra
    from hydra.core.global_hydra import GlobalHydra

    from train.config import register_configs

    register_configs()
    GlobalHydra.instance().clear()
    with hydra.initialize_config_dir(config_dir=os.path.join(ROOT, "configs"), version_base="1.3"):
        # run.name comes from the model preset Hydra chose, which only exists inside a Hydra job.
        return hydra.compose("pretrain", overrides=["run.name=test", *overrides])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world_size: int, port: int, fn, args, conn) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size))
    import torch
    import torch.distributed as dist

    # One thread per rank: the ranks share the machine's cores, and a forked child must not
    # reuse the parent's OpenMP thread pool.
    torch.set_num_threads(1)
    try:
        result = ("ok", fn(*args))
    except BaseException:  # noqa: BLE001 - the parent re-raises with the traceback
        result = ("error", traceback.format_exc())
    # Plain pickle: multiprocessing's own would hand tensors over as shared memory that lives
    # only as long as this process.
    try:
        payload = pickle.dumps(result)
    except Exception:  # noqa: BLE001 - an unpicklable result is an error too
        payload = pickle.dumps(("error", traceback.format_exc()))
    conn.send_bytes(payload)
    if dist.is_initialized():
        dist.destroy_process_group()


def run_ranks(fn, world_size: int = 2, *args, timeout: float = 300):
    """Run fn(*args) on `world_size` forked processes that form a gloo job (RANK, WORLD_SIZE,
    MASTER_ADDR/PORT set, as torchrun does); returns the per-rank results. Forking skips the
    interpreter start and the imports a spawned process repeats: a 2-rank no-op takes ~0.1 s.
    `fn` may be any callable, closures included; results must pickle."""
    ctx = mp.get_context("fork")
    port = free_port()
    pipes = [ctx.Pipe(duplex=False) for _ in range(world_size)]
    procs = [ctx.Process(target=_rank_main, args=(r, world_size, port, fn, args, pipes[r][1]))
             for r in range(world_size)]
    for p in procs:
        p.start()
    for _, send in pipes:
        send.close()  # the parent keeps only the reading ends: a dead rank reads as EOF
    results: dict[int, tuple] = {}
    waiting = {pipes[r][0]: r for r in range(world_size)}
    deadline = time.monotonic() + timeout
    try:
        while waiting:
            # A rank that fails first stops the wait: the others may be blocked in a collective
            # with it, so they get a few seconds to report, then are killed.
            if any(status != "ok" for status, _ in results.values()):
                deadline = min(deadline, time.monotonic() + 5)
            ready = mp_connection.wait(list(waiting), timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                for r in waiting.values():
                    results[r] = ("error", f"rank {r} gave no result in time (timeout {timeout:.0f} s, or "
                                           "blocked after another rank failed)")
                break
            for recv in ready:
                r = waiting.pop(recv)
                try:
                    results[r] = pickle.loads(recv.recv_bytes())
                except EOFError:
                    procs[r].join(5)
                    results[r] = ("error", f"rank {r} died without a result (exit code {procs[r].exitcode})")
    finally:
        for p in procs:
            p.join(1)
            if p.is_alive():
                p.kill()
                p.join()
    results = [results[r] for r in range(world_size)]
    failed = [f"rank {r}:\n{value}" for r, (status, value) in enumerate(results) if status != "ok"]
    if failed:
        raise RuntimeError("rank failed:\n" + "\n".join(failed))
    return [value for _, value in results]
