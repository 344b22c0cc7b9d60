"""The memory estimate (train/memory.py) against what real runs hold, and the pre-flight check:
Scout on this CPU host stops in seconds with the estimate instead of being OOM-killed."""
import json
import os
import subprocess
import sys
import time

import pytest
import torch

from tests.helpers import ROOT, compose, run_ranks


def _args(overrides):
    from train.config import model_args

    return model_args(compose(overrides))


def _ep(extra) -> int:
    return 2 if "parallel.ep=2" in extra else 1


def _sharded_state_on_ranks(overrides):
    """Bytes of this rank's parameter shards, gradients and AdamW moments after one step."""
    from parallel import build_mesh, init_distributed
    from train.build import build_parallel_model
    from train.config import model_args
    from train.optim import build_optimizer

    cfg = compose(overrides)
    args, p = model_args(cfg), cfg.parallel
    env = init_distributed("cpu")
    meshes = build_mesh(env, p.dp_shard, p.dp_replicate, p.ep, args.n_experts, p.cp)
    model = build_parallel_model(args, 0, p, env, meshes)
    opt = build_optimizer(model, cfg.optim, args)
    tokens = torch.randint(0, args.vocab_size, (1, 64))
    model(tokens).float().pow(2).mean().backward()
    opt.step()
    local = lambda t: t.to_local() if hasattr(t, "to_local") else t  # noqa: E731
    total = 0
    for param in model.parameters():
        total += local(param).numel() * 4 + local(param.grad).numel() * 4
        total += sum(local(v).numel() * 4 for k, v in opt.state[param].items() if k != "step")
    return total


# A proxy four times the tiny model's width (the MetaP width sweep's widest shapes, 33M parameters)
WIDE = ["model.dim=512", "model.n_heads=16", "model.n_kv_heads=8", "model.ffn_hidden=1536", "model.expert_hidden=768"]
LAYOUTS = pytest.mark.parametrize("extra", [[], ["parallel.ep=2"], ["parallel.ep=2", *WIDE]],
                                  ids=["fsdp", "fsdp-ep", "wide-fsdp-ep"])


@LAYOUTS
def test_sharded_state_matches_two_real_ranks(extra):
    from train.memory import Layout, estimate_memory

    overrides = ["+model=tiny", "model.vision.enabled=false", *extra]
    measured = run_ranks(_sharded_state_on_ranks, 2, overrides)
    args = _args(overrides)
    predicted = estimate_memory(args, Layout(2, 2, ep=_ep(extra), param_bytes=4), "cpu").sharded_state
    for bytes_on_rank in measured:
        assert abs(bytes_on_rank - predicted) <= 0.10 * predicted, (measured, predicted)


def _collective_bytes_on_ranks(overrides, batch_size, seq_len):
    """Bytes this rank sent or received in one forward and backward, by collective, counted at
    the calls FSDP2 and herd's expert dispatch make (train.trace.count_collectives)."""
    import torch.distributed as dist

    from parallel import build_mesh, init_distributed
    from train.build import build_parallel_model
    from train.config import model_args
    from train.trace import count_collectives

    cfg = compose(overrides)
    args, p = model_args(cfg), cfg.parallel
    env = init_distributed("cpu")
    meshes = build_mesh(env, p.dp_shard, p.dp_replicate, p.ep, args.n_experts, p.cp)
    model = build_parallel_model(args, 0, p, env, meshes)
    torch.manual_seed(dist.get_rank())
    tokens = torch.randint(0, args.vocab_size, (batch_size, seq_len))
    with count_collectives(dist.get_rank()) as counted:  # the ep group is the whole world here
        model(tokens).float().pow(2).mean().backward()
    return counted


@LAYOUTS
def test_communication_matches_bytes_counted_in_a_real_step(extra):
    """The planner's bytes per collective (train/cost.py) against the bytes two gloo ranks move in
    one forward and backward of the tiny model (fp32), counted at the collective calls: FSDP's
    within 10% (they depend only on shapes), the expert all-to-all within 25% (the planner
    assumes routing sends (ep - 1) / ep of the tokens away; a fresh router is near that)."""
    from train.cost import step_cost
    from train.memory import Layout

    overrides = ["+model=tiny", "model.vision.enabled=false", *extra]
    measured = run_ranks(_collective_bytes_on_ranks, 2, overrides, 2, 128)
    layout = Layout(2, 2, ep=_ep(extra), seq_len=128, batch_size=2, param_bytes=4, activation_bytes=4)
    predicted = step_cost(_args(overrides), layout, "h100").bytes
    assert set(predicted) == {k for k, v in measured[0].items() if v}, (predicted, measured)
    for counted in measured:
        for kind, want in predicted.items():
            tolerance = 0.25 if kind == "ep all-to-all" else 0.10
            assert abs(counted[kind] - want) <= tolerance * want, (kind, counted[kind], want)


@pytest.mark.parametrize("extra", [[], ["parallel.ep=2"]], ids=["fsdp", "fsdp-ep"])
def test_a_traced_step_counts_what_a_real_one_does(extra):
    """train/trace.py runs herd's real wrapping and one forward and backward at 2 ranks in this
    process (fake process group, fake tensors): its parameter shards, FSDP bytes and matmul FLOPs
    are those of the real 2-rank run and of the estimate; its expert all-to-all sends rows evenly,
    as the estimate assumes."""
    from train.cost import matmul_flops, step_cost
    from train.memory import Layout, estimate_memory
    from train.trace import trace_step

    overrides = ["+model=tiny", "model.vision.enabled=false", *extra]
    cfg, args = compose(overrides), _args(overrides)
    layout = Layout(2, 2, ep=_ep(extra), seq_len=128, batch_size=2, param_bytes=4, activation_bytes=4)
    trace = trace_step(args, layout, cfg.parallel)
    real = run_ranks(_collective_bytes_on_ranks, 2, overrides, 2, 128)[0]
    for kind in ("fsdp all-gather", "fsdp reduce-scatter"):
        assert trace.bytes[kind] == real[kind], (kind, trace.bytes, real)
    assert trace.bytes.get("ep all-to-all", 0) == step_cost(args, layout, "h100").bytes.get("ep all-to-all", 0)
    assert trace.sharded_state == estimate_memory(args, layout, "cpu").sharded_state
    assert trace.flops == pytest.approx(matmul_flops(args, layout), rel=0.05)
    peak = trace.peak  # FSDPMemTracker's categories at the step's peak
    assert peak["total"] == sum(v for k, v in peak.items() if k != "total")
    assert peak["sharded_param"] == trace.param_bytes and peak["act"] > 0
    assert not torch.distributed.is_initialized()  # its fake process group was another process's


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
def test_a_traced_step_has_the_memory_of_a_real_one(checkpointing):
    """The trace's peak (fake process group, fake tensors) against FSDPMemTracker on the same
    forward and backward run for real on 2 gloo ranks: an 8-layer tiny model, whose peak is in
    backward; the trace adds AdamW's two fp32 moments per parameter shard. With activation
    checkpointing the recomputation in backward must be freed as in the real run."""
    from train.memory import Layout
    from train.trace import trace_step

    overrides = ["+model=tiny", "model.vision.enabled=false", "model.n_layers=8",
                 f"parallel.activation_checkpointing={checkpointing}"]
    real = run_ranks(_tracked_peaks_on_ranks, 2, [overrides], 512)[0][0]
    traced = trace_step(_args(overrides), Layout(2, 2, seq_len=512, batch_size=1, param_bytes=4, activation_bytes=4,
                                                 activation_checkpointing=checkpointing),
                        compose(overrides).parallel).peak
    assert real["act"] + real["temp"] > 0.5 * real["total"]  # activations dominate: a peak in backward
    for kind in ("act", "temp", "sharded_param", "unsharded_param"):
        assert traced[kind] == pytest.approx(real[kind], rel=0.02), (kind, traced, real)
    assert traced["opt"] == 2 * traced["sharded_param"]  # fp32 moments, two per parameter
    assert traced["total"] == pytest.approx(real["total"] + traced["opt"], rel=0.02)


@pytest.mark.parametrize("world,dp_shard,ep", [(16, 16, 1), (256, 256, 2), (32, 16, 1)],
                         ids=["16-ranks", "256-ranks-ep2", "hsdp-16x2"])
def test_the_estimate_pads_as_fsdp_does(world, dp_shard, ep):
    """FSDP2 pads a parameter's sharded dim to a multiple of the ranks: at 256 ranks the tiny
    model's k/v projections (64 rows) are gathered as 256 rows and its experts' second dim (192 of
    them over 128 ranks) as 256. Rank 0's shards and the FSDP bytes of a traced step (herd's real
    wrapping on fake ranks) against the estimate's: equal. With 8 experts over 16 ranks and no
    ep, the experts are sharded on their second dim rather than padded to 16 experts, also when
    the 16 FSDP ranks are one of two HSDP replicas."""
    from train.cost import step_cost
    from train.memory import Layout, estimate_memory
    from train.trace import trace_step

    overrides = ["+model=tiny", "model.vision.enabled=false", f"parallel.ep={ep}"]
    args = _args(overrides)
    layout = Layout(world, dp_shard, ep=ep, seq_len=64, batch_size=1, param_bytes=4, activation_bytes=4)
    trace = trace_step(args, layout, compose(overrides).parallel)
    assert trace.sharded_state == estimate_memory(args, layout, "cpu").sharded_state
    predicted = step_cost(args, layout, "h100").bytes
    for kind in ("fsdp all-gather", "fsdp reduce-scatter"):
        assert trace.bytes[kind] == pytest.approx(predicted[kind], rel=1e-9), (kind, trace.bytes, predicted)
    from model import Transformer

    with torch.device("meta"):
        evenly = sum(p.numel() for p in Transformer(args).parameters()) * 4 / dp_shard
    assert trace.param_bytes > 1.1 * evenly if world == 256 else trace.param_bytes < 1.01 * evenly


def _tracked_peaks_on_ranks(configs, seq_len):
    """FSDPMemTracker's categories at the peak of a real forward and backward, per config (a list
    of override lists), on this gloo job: one process group, a model per config."""
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker

    from parallel import build_mesh, init_distributed
    from train.build import build_parallel_model
    from train.config import model_args
    from train.loss import compute_loss

    env, peaks = init_distributed("cpu"), []
    for overrides in configs:
        cfg = compose(overrides)
        args, p = model_args(cfg), cfg.parallel
        meshes = build_mesh(env, p.dp_shard, p.dp_replicate, p.ep, args.n_experts, p.cp)
        model = build_parallel_model(args, 0, p, env, meshes)
        tokens = torch.randint(0, args.vocab_size, (1, seq_len), generator=torch.Generator().manual_seed(0))
        tracker = FSDPMemTracker(model)
        tracker.track_inputs((tokens,))
        with tracker:
            out = compute_loss(model, {"tokens": tokens, "labels": tokens}, args, global_targets=2.0 * seq_len,
                               world_size=2)
            out.loss.backward()
        snapshot = next(iter(tracker.get_tracker_snapshot("peak").values()))
        peaks.append({str(k).split(".")[-1].lower(): int(v) for k, v in snapshot.items()})
        del model, out, tracker
    return peaks


def test_memory_estimate_against_a_real_two_rank_step():
    """The estimate against a real step on 2 gloo ranks (FSDPMemTracker at the peak of forward
    and backward, plus AdamW's two moments per parameter shard, which it does not see): with and
    without activation checkpointing and expert parallelism (all-to-all rows replayed in the
    recomputation or exchanged again), on the tiny model and the 4x wider proxy. The peak is at the loss's backward in all four, so the tracker's activations and
    backward temporaries there are what the estimate calls activations and log-softmax; and a
    pre-flight estimate must not come in under the real peak."""
    from train.memory import Layout, estimate_memory

    base = ["+model=tiny", "model.vision.enabled=false", "model.n_layers=8"]
    checkpointed = [*base, "parallel.ep=2", "parallel.activation_checkpointing=true"]
    configs = [[*base], [*base, "parallel.activation_checkpointing=true"], checkpointed,
               [*checkpointed, "parallel.replay_exchanges=false"], [*base, "parallel.ep=2", *WIDE]]
    seq_len = 1024
    peaks = run_ranks(_tracked_peaks_on_ranks, 2, configs, seq_len)[0]
    for overrides, real in zip(configs, peaks):
        cfg = compose(overrides)
        layout = Layout(2, 2, ep=cfg.parallel.ep, seq_len=seq_len, batch_size=1, param_bytes=4, activation_bytes=4,
                        activation_checkpointing=cfg.parallel.activation_checkpointing,
                        replay_exchanges=cfg.parallel.replay_exchanges)
        e = estimate_memory(_args(overrides), layout, "cpu")
        activations = real["act"] + real["temp"]
        assert abs(activations - (e.activations + e.logits)) <= 0.25 * activations, (overrides, real, e)
        held = real["total"] + 2 * real["sharded_param"]
        assert held <= e.total <= 1.5 * held, (overrides, held, e.total)


def test_plan_trace_prints_the_real_step_beside_the_estimate(capsys):
    out = _plan(["+model=tiny", "plan.gpus=8", "parallel.ep=2", "parallel.activation_checkpointing=true",
                 "plan.trace=true"], capsys)
    assert "traced: one step of herd's code on 8 fake ranks" in out
    for line in ("parameters, gradients, AdamW state", "matmul FLOPs", "fsdp all-gather", "ep all-to-all",
                 "peak memory (FSDPMemTracker)", "at the peak: parameters"):
        assert line in out.split("traced:")[1], line
    assert "(1.000x)" in out.split("traced:")[1]


def test_activation_estimate_matches_a_measured_step():
    """One step of the tiny model on an 8192-token packed row (fp32, one process): the peak RSS
    of the step against the estimate of activations and logits."""
    from train.memory import Layout, estimate_memory

    out = subprocess.run([sys.executable, "-m", "tests.model.long_step", "8192", "--docs", "8"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300, check=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    measured = json.loads(out.stdout.strip().splitlines()[-1])["step_peak_mib"] * 2**20
    args = _args(["+model=tiny", "model.vision.enabled=false"])
    e = estimate_memory(args, Layout(1, 1, seq_len=8192, param_bytes=4, activation_bytes=4), "cpu")
    predicted = e.activations + e.logits
    assert abs(measured - predicted) <= 0.25 * measured, (measured / 2**20, predicted / 2**20)


def test_scout_on_a_cpu_host_stops_in_seconds_with_the_estimate(tmp_path):
    start = time.monotonic()
    out = subprocess.run([sys.executable, "launch/pretrain.py", "+model=scout", f"run.dir={tmp_path}/run"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert time.monotonic() - start < 30
    assert out.returncode == 2, out.stderr[-2000:]
    assert "this run needs about" in out.stderr and "108.64B parameters" in out.stderr
    assert "train.preflight=false" in out.stderr and "x h100" in out.stderr
    assert not os.path.exists(tmp_path / "run" / "checkpoints")


def _plan(argv, capsys) -> str:
    from hydra.core.global_hydra import GlobalHydra

    from launch.plan import main

    GlobalHydra.instance().clear()
    main(argv)
    return capsys.readouterr().out


def test_plan_reports_what_fits_on_a_cluster(capsys):
    out = _plan(["+model=scout", "plan.gpus=64", "parallel.activation_checkpointing=true"], capsys)
    assert "64 x h100" in out and "fits," in out
    out = _plan(["+model=scout", "plan.gpus=8"], capsys)
    assert "does not fit" in out and "GPUs" in out
    with pytest.raises(SystemExit, match="plan.gpu='a100'"):
        _plan(["+model=scout", "plan.gpus=8", "plan.gpu=a100"], capsys)


def test_cost_model_sees_what_expert_parallelism_and_hsdp_save():
    from train.cost import search_layouts, step_cost
    from train.memory import Layout

    args = _args(["+model=scout"])
    base = Layout(64, 64, seq_len=8192, batch_size=1, activation_checkpointing=True)
    fsdp = lambda c: c.bytes["fsdp all-gather"] + c.bytes["fsdp reduce-scatter"]  # noqa: E731
    plain, ep16 = step_cost(args, base, "h100"), step_cost(args, Layout(**{**vars(base), "ep": 16}), "h100")
    assert fsdp(ep16) < fsdp(plain) / 4 and "ep all-to-all" in ep16.bytes
    hsdp = step_cost(args, Layout(**{**vars(base), "dp_shard": 8}), "h100")
    assert "hsdp all-reduce" in hsdp.bytes and hsdp.memory > plain.memory  # shards over 8, not 64
    ranked = search_layouts(args, base, "h100")
    assert ranked and all(c.memory <= 80 * 10**9 for c in ranked)
    assert [c.tokens_per_s for c in ranked] == sorted((c.tokens_per_s for c in ranked), reverse=True)
    assert ranked[0].layout.ep > 1  # experts gathered among fewer ranks win on Scout


def test_plan_prints_the_fastest_layout_and_its_command(capsys):
    out = _plan(["+model=behemoth", "plan.gpus=32768", "train.batch_size=1", "train.seq_len=8192"], capsys)
    assert "layouts that fit, fastest first" in out
    assert "launch/pretrain.py +model=behemoth parallel.dp_shard=" in out and "parallel.ep=16" in out
    assert "MFU" in out and "fsdp all-gather" in out
