"""Shared test helpers: compose the real Hydra config, and run a function on N gloo ranks."""
from __future__ import annotations

import os
import socket
import sys
import traceback

import torch.multiprocessing as mp

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
        # run.name comes from hydra:runtime.choices, which only exists inside a Hydra job.
        return hydra.compose("pretrain", overrides=["run.name=test", *overrides])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, fn, args, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size))
    import torch.distributed as dist

    try:
        results[rank] = ("ok", fn(*args))
    except BaseException:  # noqa: BLE001 - the parent re-raises with the traceback
        results[rank] = ("error", traceback.format_exc())
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn, world_size: int = 2, *args):
    """Run fn(*args) on `world_size` spawned processes (gloo); returns the per-rank results."""
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        results = manager.dict()
        procs = [ctx.Process(target=_worker, args=(r, world_size, free_port_cache(), fn, args, results))
                 for r in range(world_size)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=300)
            if p.is_alive():
                p.kill()
                raise TimeoutError("a rank did not finish in 300 s")
        out = [results.get(r, ("error", "rank died without a result")) for r in range(world_size)]
    _PORT.clear()
    for status, value in out:
        if status != "ok":
            raise RuntimeError(f"rank failed:\n{value}")
    return [v for _, v in out]


_PORT: list[int] = []


def free_port_cache() -> int:
    # One port per run_ranks call, shared by all its ranks.
    if not _PORT:
        _PORT.append(free_port())
    return _PORT[0]
