"""parallel/mesh.py: the mesh shape for a layout and its errors, the device meshes on 4 ranks
(names, sizes and which ranks share a group), and the Distributed helpers."""
import os
import time

import pytest
import torch

from parallel import Distributed, build_mesh, init_distributed, mesh_shape
from tests.helpers import run_ranks

CPU = torch.device("cpu")


@pytest.mark.parametrize("world, dp_shard, dp_replicate, ep, n_experts, shape", [
    (1, -1, 1, 1, 0, (1, 1, 1)),  # one process, a dense model
    (4, -1, 1, 1, 8, (1, 4, 1)),  # FSDP over every rank
    (4, 4, 1, 1, 8, (1, 4, 1)),  # the same, spelled out
    (8, -1, 2, 1, 8, (2, 4, 1)),  # HSDP: 2 replicas of 4
    (4, -1, 1, 2, 8, (1, 2, 2)),  # EP carved out of dp_shard
    (4, -1, 1, 4, 8, (1, 1, 4)),
    (8, 2, 4, 2, 2, (4, 1, 2)),  # HSDP and EP; one expert per EP rank
    (4, -1, 1, 1, 6, (1, 4, 1)),  # without EP the expert count need not divide anything
])
def test_mesh_shape_valid(world, dp_shard, dp_replicate, ep, n_experts, shape):
    assert mesh_shape(world, dp_shard, dp_replicate, ep, n_experts) == shape


@pytest.mark.parametrize("world, dp_shard, dp_replicate, ep, n_experts, message", [
    (4, -1, 3, 1, 8, "parallel.dp_replicate=3 does not divide the world size 4"),
    (4, 3, 1, 1, 8, "parallel.dp_replicate=1 x parallel.dp_shard=3 = 3 ranks, but the job has 4"),
    (8, 2, 2, 1, 8, "parallel.dp_replicate=2 x parallel.dp_shard=2 = 4 ranks, but the job has 8"),
    (4, 0, 1, 1, 8, "parallel.dp_shard=0"),
    (4, -1, 1, 3, 6, "parallel.ep=3 must divide the data-parallel shard size 4"),
    (8, -1, 2, 8, 8, "parallel.ep=8 must divide the data-parallel shard size 4"),  # ep > dp_shard
    (4, -1, 1, 0, 8, "parallel.ep=0"),
    (4, -1, 1, 4, 6, "parallel.ep=4 must divide the number of experts model.n_experts=6"),
    (4, -1, 1, 2, 0, "model.n_experts=0"),  # EP of a dense model
])
def test_mesh_shape_errors_name_the_bad_value(world, dp_shard, dp_replicate, ep, n_experts, message):
    with pytest.raises(ValueError) as e:
        mesh_shape(world, dp_shard, dp_replicate, ep, n_experts)
    assert message in str(e.value)


@pytest.mark.parametrize("dp_replicate", [0, -1])
def test_mesh_shape_refuses_non_positive_dp_replicate(dp_replicate):
    with pytest.raises(ValueError, match=f"parallel.dp_replicate={dp_replicate}"):
        mesh_shape(4, -1, dp_replicate, 1, 8)


def test_build_mesh_single_process():
    env = Distributed(rank=0, world_size=1, local_rank=0, device=CPU)
    assert build_mesh(env, -1, 1, 1, 8) is None
    with pytest.raises(ValueError, match="parallel.ep=2"):  # a bad layout is refused even with nothing to shard
        build_mesh(env, -1, 1, 2, 8)


def _groups(mesh):
    """Per dimension name: the global ranks of this rank's group along it."""
    import torch.distributed as dist

    return {name: dist.get_process_group_ranks(mesh[name].get_group()) for name in mesh.mesh_dim_names}


def _four_rank_meshes():
    import torch.distributed as dist

    env = init_distributed("cpu")
    out = {}
    for case, (dp_replicate, ep) in {"fsdp": (1, 1), "hsdp": (2, 1), "ep": (1, 2), "hsdp_ep": (2, 2)}.items():
        meshes = build_mesh(env, -1, dp_replicate, ep, 8)
        row = {"shape": meshes.shape, "dense_names": meshes.dense.mesh_dim_names,
               "dense_ranks": meshes.dense.mesh.tolist(), "dense_groups": _groups(meshes.dense),
               "experts": meshes.experts is not None}
        if meshes.experts is not None:
            experts = meshes.experts
            ep_sum = torch.tensor([float(env.rank)])
            dist.all_reduce(ep_sum, group=experts["ep"].get_group())
            row.update(expert_names=experts.mesh_dim_names, expert_sizes=tuple(experts.mesh.shape),
                       expert_ranks=experts.mesh.tolist(), expert_groups=_groups(experts),
                       ep_local_rank=experts["ep"].get_local_rank(), ep_sum=ep_sum.item(),
                       shard_in_ep=dist.get_process_group_ranks(experts["dp_shard_in_ep"].get_group()))
        out[case] = row
    return out


def test_meshes_on_four_ranks():
    results = run_ranks(_four_rank_meshes, 4)

    for rank, r in enumerate(results):
        fsdp = r["fsdp"]
        assert fsdp["shape"] == (1, 4, 1) and not fsdp["experts"]
        assert fsdp["dense_names"] == ("dp_shard",) and fsdp["dense_ranks"] == [0, 1, 2, 3]
        assert fsdp["dense_groups"] == {"dp_shard": [0, 1, 2, 3]}

        # HSDP: replicas are rows of the row-major 2 x 2 grid; rank r shards with its row.
        hsdp = r["hsdp"]
        assert hsdp["shape"] == (2, 2, 1) and not hsdp["experts"]
        assert hsdp["dense_names"] == ("dp_replicate", "dp_shard")
        assert hsdp["dense_ranks"] == [[0, 1], [2, 3]]
        row, col = divmod(rank, 2)
        assert hsdp["dense_groups"] == {"dp_replicate": [col, col + 2], "dp_shard": [2 * row, 2 * row + 1]}

        # EP=2 inside dp_shard=4: neighbouring ranks form an ep group; the ranks holding the same
        # experts (same position in their ep group) form dp_shard_mod_ep.
        ep = r["ep"]
        assert ep["shape"] == (1, 2, 2) and ep["experts"]
        assert ep["dense_names"] == ("dp_shard",) and ep["dense_ranks"] == [0, 1, 2, 3]
        assert ep["expert_names"] == ("dp_replicate", "dp_shard_mod_ep", "ep")
        assert ep["expert_sizes"] == (1, 2, 2) and ep["expert_ranks"] == [[[0, 1], [2, 3]]]
        assert ep["expert_groups"] == {"dp_replicate": [rank], "dp_shard_mod_ep": [col, col + 2],
                                       "ep": [2 * row, 2 * row + 1]}
        assert ep["ep_local_rank"] == col
        assert ep["ep_sum"] == [1.0, 5.0][row]  # 0 + 1, 2 + 3: the all-reduce stayed in the ep group
        assert ep["shard_in_ep"] == [0, 1, 2, 3]

        # HSDP x EP: each replica is one ep group, with dp_shard_mod_ep of size 1.
        both = r["hsdp_ep"]
        assert both["shape"] == (2, 1, 2) and both["experts"]
        assert both["dense_names"] == ("dp_replicate", "dp_shard") and both["dense_ranks"] == [[0, 1], [2, 3]]
        assert both["expert_sizes"] == (2, 1, 2) and both["expert_ranks"] == [[[0, 1]], [[2, 3]]]
        assert both["expert_groups"] == {"dp_replicate": [col, col + 2], "dp_shard_mod_ep": [rank],
                                         "ep": [2 * row, 2 * row + 1]}
        assert both["ep_sum"] == [1.0, 5.0][row]
        assert both["shard_in_ep"] == [2 * row, 2 * row + 1]


def _reduce_and_wait(flag_path):
    env = init_distributed("cpu")
    assert env.world_size == 2 and env.device == CPU
    t = torch.tensor([float(env.rank), 10.0 - env.rank, 3.0])
    before = t.clone()
    total, largest = env.all_reduce(t), env.all_reduce(t, op="max")
    as_long = env.all_reduce(torch.tensor([env.rank + 1]))
    untouched = torch.equal(t, before) and total is not t and largest is not t

    # barrier: rank 1 writes the flag late, then joins; rank 0 looks for it only after the barrier.
    if env.rank == 1:
        time.sleep(0.3)
        with open(flag_path, "w") as f:
            f.write("1")
    env.barrier()
    return {"sum": total.tolist(), "max": largest.tolist(), "long": as_long.tolist(), "dtype": as_long.dtype,
            "device": total.device, "untouched": untouched, "flag_seen": os.path.exists(flag_path)}


def test_distributed_all_reduce_and_barrier(tmp_path):
    results = run_ranks(_reduce_and_wait, 2, str(tmp_path / "flag"))
    for r in results:
        assert r["sum"] == [1.0, 19.0, 6.0]
        assert r["max"] == [1.0, 10.0, 3.0]
        assert r["long"] == [3] and r["dtype"] == torch.int64
        assert r["device"] == CPU and r["untouched"]
        assert r["flag_seen"]


def test_init_distributed_world_of_one(monkeypatch):
    import torch.distributed as dist

    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    env = init_distributed("cpu")
    assert (env.rank, env.world_size, env.local_rank, env.device, env.is_main) == (0, 1, 0, CPU, True)
    assert not dist.is_initialized()
    t = torch.ones(2)
    assert env.all_reduce(t) is t  # nothing to reduce over
    env.barrier()  # a no-op, not an error
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="train.device=cuda"):
            init_distributed("cuda")
