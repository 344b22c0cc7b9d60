"""Expert parallelism on 2 gloo ranks: ep=2 trains exactly like ep=1 (losses, gradients,
checkpoints that move between layouts), the all-to-all dispatcher is dropless under extreme
routing, and the aux-loss-free bias balances load without touching the scores."""
import json
import os
import shutil

import pytest
import torch

from tests.helpers import compose, run_ranks

STEPS = 10
# The text decoder is what EP touches: text data, no vision encoder.
TEXT = ["+model=tiny", "model.vision.enabled=false", "data.kind=text", "train.seq_len=128", "train.batch_size=2"]
COMMON = TEXT + [f"train.steps={STEPS}", "optim.lr=1e-3", "optim.warmup_steps=2", "model.router_aux_loss_coef=0.02",
                 "model.router_z_loss_coef=0.001", "logging.expert_table_interval=5"]


def _one_step_grads(overrides):
    """Full router and expert gradients after one forward/backward of the training loss, and the
    number of all-to-alls launched."""
    from data.text import TextBatches
    from parallel import build_mesh, expert, init_distributed, parallelize_model
    from train.build import build_model
    from train.config import model_args
    from train.loss import compute_loss, count_targets

    cfg = compose(overrides)
    args = model_args(cfg)
    p, t = cfg.parallel, cfg.train
    env = init_distributed("cpu")
    model = build_model(args, t.seed)
    model = parallelize_model(model, build_mesh(env, p.dp_shard, p.dp_replicate, p.ep, args.n_experts),
                              activation_checkpointing=p.activation_checkpointing,
                              replay_exchanges=p.replay_exchanges)
    batch = next(TextBatches(None, t.seq_len, t.batch_size, args.vocab_size, env.rank, env.world_size, t.seed))
    launched = []
    start = expert._all_to_all_start
    expert._all_to_all_start = lambda *a: launched.append(1) or start(*a)
    try:
        n_targets = env.all_reduce(count_targets([batch]))
        compute_loss(model, batch, args, global_targets=n_targets, world_size=env.world_size).loss.backward()
    finally:
        expert._all_to_all_start = start
    grads = {name.replace("._checkpoint_wrapped_module", ""):
             (prm.grad.full_tensor() if hasattr(prm.grad, "full_tensor") else prm.grad).clone()
             for name, prm in model.named_parameters() if ".router." in name or ".experts." in name}
    return grads, len(launched)


def _train_layouts(tmp):
    """On each of 2 ranks: ep=1 and ep=2 runs, a run that resumes with ep=1 from an ep=2
    checkpoint, and one-step gradients with and without activation checkpointing."""
    from train.loop import train

    torch.set_num_threads(1)

    def losses(overrides):
        return [(r["loss"], r["grad_norm"]) for r in train(compose(COMMON + overrides))]

    out = {"ep1": losses(["parallel.ep=1", f"run.dir={tmp}/ep1"]),
           "ep2": losses(["parallel.ep=2", f"run.dir={tmp}/ep2", "checkpoint.interval=5"])}
    if int(os.environ["RANK"]) == 0:
        shutil.copytree(f"{tmp}/ep2/checkpoints/step-00000005", f"{tmp}/moved/checkpoints/step-00000005")
    torch.distributed.barrier()
    out["ep2_then_ep1"] = losses(["parallel.ep=1", f"run.dir={tmp}/moved"])
    with open(f"{tmp}/ep2/metrics.jsonl") as f:
        out["metrics"] = [json.loads(line) for line in f]
    one = TEXT + ["model.router_z_loss_coef=0.001"]
    out["grads1"], _ = _one_step_grads(one + ["parallel.ep=1"])
    out["grads2"], out["exchanges"] = _one_step_grads(one + ["parallel.ep=2"])
    out["grads2_ac"], out["exchanges_ac"] = _one_step_grads(one + ["parallel.ep=2",
                                                                   "parallel.activation_checkpointing=true"])
    out["grads2_ac_again"], out["exchanges_ac_again"] = _one_step_grads(
        one + ["parallel.ep=2", "parallel.activation_checkpointing=true", "parallel.replay_exchanges=false"])
    return out


def test_ep2_trains_like_ep1(tmp_path):
    r0, r1 = run_ranks(_train_layouts, 2, str(tmp_path))
    assert r0["ep2"] == r1["ep2"]  # every rank logs the same global numbers
    ep1, ep2 = r0["ep1"], r0["ep2"]
    assert ep1[-1][0] < ep1[0][0] - 1.0  # it learns, so the comparison means something
    # Same ranks, same data, fp32: EP changes only where each expert's rows are computed (the
    # grouped matmul sees the same rows in the same order as in one process), so losses agree
    # to float rounding, ~1e-7; 1e-5 leaves room for rounding compounding over 10 steps.
    for step, ((l1, g1), (l2, g2)) in enumerate(zip(ep1, ep2)):
        assert l2 == pytest.approx(l1, rel=1e-5), step
        assert g2 == pytest.approx(g1, rel=1e-4), step  # norm of sums taken in a different order

    # An ep=2 checkpoint resumes under ep=1 (full-size expert tensors, optimizer state and all)
    # and continues the ep=1 curve.
    moved = r0["ep2_then_ep1"]
    assert len(moved) == STEPS - 5
    for step, ((l1, _), (l2, _)) in enumerate(zip(ep1[5:], moved)):
        assert l2 == pytest.approx(l1, rel=1e-5), step

    # Router and expert gradients after one step: the full tensors match.
    g1, g2, g2ac, g2again = r0["grads1"], r0["grads2"], r0["grads2_ac"], r0["grads2_ac_again"]
    assert g1.keys() == g2.keys() and any(".experts.w1" in k for k in g1)
    for name in g1:
        torch.testing.assert_close(g2[name], g1[name], rtol=1e-5, atol=1e-7, msg=name)
        torch.testing.assert_close(g2ac[name], g2[name], rtol=0, atol=0, msg=name)
        torch.testing.assert_close(g2again[name], g2[name], rtol=0, atol=0, msg=name)
    # Recomputation under activation checkpointing sends no tokens: per MoE layer, 3 exchanges
    # forward (counts, rows, results) and 2 backward (the gradients of rows and results); with
    # parallel.replay_exchanges=false the recomputation makes the forward's 3 again.
    assert r0["exchanges"] == r0["exchanges_ac"] == 2 * 5
    assert r0["exchanges_ac_again"] == 2 * 8

    # Expert metrics: every step has per-layer load; every 5th step the full table.
    rows = r0["metrics"]
    for row in rows:
        for layer in (1, 3):
            assert row[f"moe/layer{layer}/dropped"] == 0
            assert row[f"moe/layer{layer}/imbalance"] >= 1.0
    tables = [row for row in rows if "expert_counts" in row]
    assert [row["step"] for row in tables] == [5, 10]
    assert all(sum(layer) == 2 * 2 * 128 for layer in tables[0]["expert_counts"])  # 2 ranks x 2 rows x 128 tokens


CASES = {"all_to_one": [0, 0, 0, 48],  # every token of both ranks picks expert 3: rank 0 receives none
         "per_rank": [24, 24, 0, 0],  # rank 0's tokens pick expert 0, rank 1's expert 1: rank 1 receives none
         "top2": None,  # random routing, two experts per token: counts from the router logits only
         "all_to_one_loop": [0, 0, 0, 48]}  # all_to_one with the per-expert loop instead of grouped_mm


def _extreme_routing():
    """An MoE layer with hand-set routing on 2 ranks (ep=2, experts 0-1 on rank 0, 2-3 on
    rank 1) against the same layer in one process on both ranks' tokens."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    import model.moe
    from model import ModelArgs, MoE
    from parallel import apply_expert_parallel

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("ep",))
    results = {}
    grouped_mm_supported = model.moe._grouped_mm_supported
    try:
        for case in CASES:
            # Each case sets the kernel choice, and the finally puts the original back for
            # whatever runs after this function in the process.
            model.moe._grouped_mm_supported = (lambda x: False) if case.endswith("_loop") else grouped_mm_supported
            torch.manual_seed(0)
            args = ModelArgs(dim=32, expert_hidden=16, n_experts=4, top_k=2 if case == "top2" else 1, n_layers=1,
                             n_heads=2, n_kv_heads=1)
            ref = MoE(args)
            for p in ref.parameters():
                torch.nn.init.normal_(p, std=0.3)
            x = torch.randn(2, 24, 32)  # one row of tokens per rank
            with torch.no_grad():
                if case.startswith("all_to_one"):
                    ref.router.weight.zero_()
                    ref.router.weight[3, 0] = 10.0
                    x[..., 0] = x[..., 0].abs() + 0.1
                elif case == "per_rank":
                    ref.router.weight.zero_()
                    ref.router.weight[0, 0] = ref.router.weight[1, 1] = 10.0
                    x[0, :, 0], x[0, :, 1] = 1.0, -1.0
                    x[1, :, 0], x[1, :, 1] = -1.0, 1.0
                # The tokens per expert the routing should give, counted apart from the layer:
                # top-k of the router logits of both ranks' tokens.
                chosen = torch.topk(x.reshape(-1, 32) @ ref.router.weight.T, args.top_k).indices
                expected = torch.bincount(chosen.flatten(), minlength=args.n_experts).tolist()
            g = torch.randn(2, 24, 32)

            moe = MoE(args)
            moe.load_state_dict(ref.state_dict())
            apply_expert_parallel(moe, mesh)
            xr = x[rank].clone().requires_grad_()
            out, _, counts = moe(xr)
            (out * g[rank]).sum().backward()

            xf = x.clone().requires_grad_()
            ref_out, _, ref_counts = ref(xf)
            (ref_out * g).sum().backward()

            torch.testing.assert_close(out, ref_out[rank], rtol=1e-5, atol=1e-6, msg=case)
            torch.testing.assert_close(xr.grad, xf.grad[rank], rtol=1e-5, atol=1e-6, msg=case)
            dist.all_reduce(counts)
            assert counts.tolist() == ref_counts.tolist(), case
            for name, p in moe.named_parameters():
                if hasattr(p.grad, "full_tensor"):  # routed experts: each rank holds its experts' rows
                    grad = p.grad.full_tensor()
                else:  # dense weights: each rank holds its tokens' part
                    grad = p.grad.clone()
                    dist.all_reduce(grad)
                torch.testing.assert_close(grad, dict(ref.named_parameters())[name].grad, rtol=1e-5, atol=1e-6,
                                           msg=f"{case} {name}")
            results[case] = (ref_counts.tolist(), expected)
    finally:
        model.moe._grouped_mm_supported = grouped_mm_supported
    return results


def test_dispatcher_extreme_routing():
    """No token is dropped and nothing differs from one process, also when a rank receives no
    tokens at all (zero-size splits) and experts get none."""
    counts = run_ranks(_extreme_routing, 2)[0]
    for case, by_hand in CASES.items():
        got, from_logits = counts[case]
        assert got == from_logits, case
        if by_hand is not None:
            assert got == by_hand, case
        assert sum(got) == 2 * 24 * (2 if case == "top2" else 1), case


def test_bad_ep_is_refused_before_compute():
    from parallel import mesh_shape

    with pytest.raises(ValueError, match="model.n_experts=6"):
        mesh_shape(world_size=4, dp_shard=-1, dp_replicate=1, ep=4, n_experts=6)
    with pytest.raises(ValueError, match="parallel.ep=3"):
        mesh_shape(world_size=4, dp_shard=-1, dp_replicate=1, ep=3, n_experts=6)
    assert mesh_shape(world_size=4, dp_shard=-1, dp_replicate=1, ep=2, n_experts=8) == (1, 2, 2)


def test_aux_free_bias_balances_load_and_leaves_scores_alone():
    from model import ModelArgs, MoE
    from train.balance import update_expert_bias

    torch.manual_seed(0)
    args = ModelArgs(dim=16, expert_hidden=8, n_experts=4, top_k=1, n_layers=1, n_heads=2, n_kv_heads=1,
                     load_balance="aux_free")
    moe = MoE(args)
    assert "expert_bias" in moe.state_dict()  # a persistent buffer: checkpoints carry it
    assert "expert_bias" not in MoE(ModelArgs(dim=16, expert_hidden=8, n_experts=4, n_layers=1, n_heads=2,
                                              n_kv_heads=1)).state_dict()  # HF layout untouched
    with torch.no_grad():
        torch.nn.init.normal_(moe.router.weight, std=0.1)
        moe.router.weight[0, 0] = 1.0  # expert 0 is favoured by most tokens
    x = torch.randn(512, 16)
    x[:, 0] = x[:, 0].abs() + 0.5

    def imbalance():
        counts = moe(x)[2]
        return counts, (counts.max() / counts.float().mean()).item()

    counts, before = imbalance()
    assert before > 2.0
    for _ in range(60):
        update_expert_bias([moe], counts[None], rate=0.02)
        counts, after = imbalance()
    assert after < 1.5 < before
    assert moe.expert_bias[0] < 0 < moe.expert_bias[1:].max()  # the favoured expert is held back

    # Selection uses logits + bias; the scores are still the sigmoid of the raw logits.
    logits, experts, scores = moe.route(x)
    torch.testing.assert_close(experts, torch.topk(logits + moe.expert_bias, 1).indices)
    torch.testing.assert_close(scores, torch.sigmoid(logits.gather(-1, experts)))
    assert not torch.equal(experts, torch.topk(logits, 1).indices)  # the bias did change choices


def _train(overrides):
    from train.loop import train

    return train(compose(overrides))


def test_ep2_trains_on_the_multimodal_shards(tmp_path):
    """The default data path (shards, images, 2 loader workers per rank) with ep=2 and the
    aux-free bias, on 2 ranks: it learns, drops nothing, and saves full-size experts."""
    run_ranks(_train, 2, ["+model=tiny", "parallel.ep=2", "train.steps=30", "optim.lr=3e-3", "optim.warmup_steps=5",
                          "train.seq_len=128", "train.batch_size=4", "model.load_balance=aux_free",
                          "logging.expert_table_interval=10", "logging.wandb.mode=disabled", f"run.dir={tmp_path}"])
    with open(tmp_path / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert [r["step"] for r in rows] == list(range(1, 31))
    assert rows[-1]["loss"] < rows[0]["loss"] - 2.0, (rows[0]["loss"], rows[-1]["loss"])
    assert [r["step"] for r in rows if "expert_counts" in r] == [10, 20, 30]
    assert all(r["moe/layer1/dropped"] == 0 for r in rows)
    from torch.distributed.checkpoint import FileSystemReader

    saved = FileSystemReader(str(tmp_path / "checkpoints" / "step-00000030")).read_metadata().state_dict_metadata
    assert "model.layers.1.feed_forward.expert_bias" in saved
    assert saved["model.layers.1.feed_forward.experts.w1"].size == torch.Size([8, 128, 192])  # full size
