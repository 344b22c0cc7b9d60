"""parallel.clip_grad_norm_: torch's clip_grad_norm_ on plain tensors, and one norm over the
gradients of an expert-parallel model, whose parameters live on two device meshes."""
import math

import pytest
import torch

from parallel import clip_grad_norm_
from tests.helpers import compose, run_ranks


def _params_with_grads(seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(3, 4), (5,), (2, 3, 2), (1,)]
    params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g) * 3.0
    return params


def _copy(params):
    out = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for c, p in zip(out, params):
        c.grad = None if p.grad is None else p.grad.clone()
    return out


@pytest.mark.parametrize("norm_type", [2.0, math.inf])
@pytest.mark.parametrize("max_norm", [0.5, 1e3])
def test_matches_torch_on_plain_tensors(norm_type, max_norm):
    ours, theirs = _params_with_grads(), _params_with_grads()
    before = [p.grad.clone() for p in ours]
    total = clip_grad_norm_(ours, max_norm, norm_type)
    expected = torch.nn.utils.clip_grad_norm_(theirs, max_norm, norm_type)
    torch.testing.assert_close(total, expected, rtol=0, atol=0)
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0)
    if max_norm < total:  # the small max_norm really clipped, so the comparison covers the scaling
        assert not torch.equal(ours[0].grad, before[0])
    else:
        assert all(torch.equal(p.grad, b) for p, b in zip(ours, before))


def test_inf_max_norm_leaves_gradients_untouched():
    params = _params_with_grads()
    before = [p.grad.clone() for p in params]
    total = clip_grad_norm_(params, math.inf)
    assert total.item() > 1.0  # a norm that any finite max_norm of 1 would have clipped
    for p, b in zip(params, before):
        assert torch.equal(p.grad, b)


def test_parameters_without_grads_are_ignored():
    params = _params_with_grads()
    frozen = torch.nn.Parameter(torch.full((4,), 100.0))  # no .grad: must not count nor get one
    mixed = _copy(params)
    mixed.insert(1, frozen)
    total = clip_grad_norm_(mixed, 1.0)
    expected = torch.nn.utils.clip_grad_norm_(params, 1.0)
    torch.testing.assert_close(total, expected, rtol=0, atol=0)
    assert frozen.grad is None
    for p, q in zip([m for m in mixed if m is not frozen], params):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0)


def test_no_grads_gives_zero():
    p = torch.nn.Parameter(torch.ones(3))
    assert clip_grad_norm_([p], 1.0).item() == 0.0
    assert clip_grad_norm_([], 1.0).item() == 0.0
    assert p.grad is None


def _ep2_clip(cfg, model):
    """One backward of the training loss on the tiny model with ep=2 on this rank, then
    clip_grad_norm_; returns what the parent checks."""
    from data.text import TextBatches
    from parallel import build_mesh, init_distributed, parallelize_model
    from train.config import model_args
    from train.loss import compute_loss, count_targets

    args = model_args(cfg)
    p, t = cfg.parallel, cfg.train
    env = init_distributed("cpu")
    model = parallelize_model(model, build_mesh(env, p.dp_shard, p.dp_replicate, p.ep, args.n_experts))
    batch = next(TextBatches(None, t.seq_len, t.batch_size, args.vocab_size, env.rank, env.world_size, t.seed))
    n_targets = env.all_reduce(count_targets([batch]))
    compute_loss(model, batch, args, global_targets=n_targets, world_size=env.world_size).loss.backward()

    params = list(model.parameters())
    meshes = {str(prm.grad.device_mesh) for prm in params}
    full = [prm.grad.full_tensor().double() for prm in params]
    full_norm = torch.cat([g.flatten() for g in full]).norm().item()
    # What a norm of the local shards only would give: the test must tell it from the true norm.
    local_norm = torch.cat([prm.grad.to_local().double().flatten() for prm in params]).norm().item()

    inf_norm = clip_grad_norm_(params, math.inf, norm_type=math.inf)  # max_norm=inf: measures only
    full_max = max(g.abs().max().item() for g in full)
    max_norm = full_norm / 4
    norm = clip_grad_norm_(params, max_norm)
    clipped = [prm.grad.full_tensor().double() for prm in params]
    return {"meshes": meshes, "full_norm": full_norm, "local_norm": local_norm, "norm": norm.item(),
            "norm_is_plain": type(norm) is torch.Tensor, "max_norm": max_norm,
            "inf_norm": inf_norm.item(), "full_max": full_max,
            # Each gradient's scale factor (least squares), for those that are not all zero.
            "ratios": [(c.flatten() @ g.flatten() / (g.flatten() @ g.flatten())).item()
                       for c, g in zip(clipped, full) if g.any()],
            "max_dev": max(((c - g * (max_norm / full_norm)).abs().max() / g.abs().max()).item()
                           for c, g in zip(clipped, full) if g.any()),
            "n_params": len(params),
            "clipped_total": torch.cat([c.flatten() for c in clipped]).norm().item()}


def test_norm_over_two_meshes_with_expert_parallelism():
    from train.build import build_model
    from train.config import model_args

    cfg = compose(["+model=tiny", "model.vision.enabled=false", "data.kind=text", "train.seq_len=32",
                   "train.batch_size=1", "parallel.ep=2"])
    model = build_model(model_args(cfg), cfg.train.seed)  # every rank starts from these weights, as in train()
    r0, r1 = run_ranks(_ep2_clip, 2, cfg, model)

    # Dense weights on dp_shard, routed experts on dp_shard_mod_ep x ep: two meshes in one norm.
    assert len(r0["meshes"]) == 2, r0["meshes"]
    assert r0["norm_is_plain"]
    assert r0["norm"] == r1["norm"]  # bitwise: every rank clips by the same coefficient
    assert r0["norm"] == pytest.approx(r0["full_norm"], rel=1e-5)
    assert r0["local_norm"] != pytest.approx(r0["full_norm"], rel=1e-2)  # a missing reduction would show
    assert r0["inf_norm"] == r1["inf_norm"] == pytest.approx(r0["full_max"], rel=1e-6)  # largest |g| anywhere

    # Clipped to max_norm = norm / 4: the full clipped gradients have norm max_norm, and every
    # gradient shrank by the same factor.
    assert len(r0["ratios"]) == r0["n_params"]  # every gradient is non-zero, so every one is checked
    assert r0["clipped_total"] == pytest.approx(r0["max_norm"], rel=1e-5)
    assert r0["ratios"] == pytest.approx([0.25] * len(r0["ratios"]), rel=1e-5)
    assert r0["max_dev"] < 1e-5  # relative to each gradient's largest entry
    assert r0["clipped_total"] == r1["clipped_total"]
