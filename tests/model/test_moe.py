"""The token-sparse MoE equals a naive loop over each token's chosen experts."""
import pytest
import torch
import torch.nn.functional as F

from model import ModelArgs, MoE
from model.moe import GroupedExperts


def naive_moe(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    flat = x.reshape(-1, x.shape[-1])
    logits = flat @ moe.router.weight.T
    out = torch.zeros_like(flat)
    ex = moe.experts
    for t in range(flat.shape[0]):
        top = torch.topk(logits[t], moe.top_k)
        for value, e in zip(top.values, top.indices):
            xin = flat[t] * torch.sigmoid(value)
            out[t] += (F.silu(xin @ ex.w1[e]) * (xin @ ex.w3[e])) @ ex.w2[e]
    se = moe.shared_expert
    out += se.w2(F.silu(se.w1(flat)) * se.w3(flat))
    return out.view_as(x)


def make_moe(top_k, n_experts=8, seed=0):
    torch.manual_seed(seed)
    args = ModelArgs(dim=32, expert_hidden=24, n_experts=n_experts, top_k=top_k, n_layers=1, n_heads=2, n_kv_heads=1)
    moe = MoE(args)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return moe


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_sparse_equals_naive(top_k):
    moe = make_moe(top_k)
    x = torch.randn(3, 11, 32)
    out, losses, counts = moe(x)
    torch.testing.assert_close(out, naive_moe(moe, x), rtol=1e-5, atol=1e-5)
    assert counts.sum() == 3 * 11 * top_k
    assert torch.isfinite(losses).all()


def test_gradients_equal_naive():
    moe = make_moe(2)
    x = torch.randn(2, 9, 32, requires_grad=True)
    g = torch.randn(2, 9, 32)
    grads = torch.autograd.grad((moe(x)[0] * g).sum(), [x, *moe.parameters()])
    ref = torch.autograd.grad((naive_moe(moe, x) * g).sum(), [x, *moe.parameters()])
    for a, b in zip(grads, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_only_chosen_experts_are_computed(monkeypatch):
    """An expert no token chose gets no rows and no gradient: the layer is token-sparse."""
    moe = make_moe(1, n_experts=4)
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[2, 0] = 10.0  # every token with x[0] > 0 picks expert 2 ...
    x = torch.randn(64, 32).abs()  # ... and here all do
    out, _, counts = moe(x)
    assert counts.tolist() == [0, 0, 64, 0]
    out.pow(2).sum().backward()
    for e in (0, 1, 3):
        assert moe.experts.w1.grad[e].abs().sum() == 0
    assert moe.experts.w1.grad[2].abs().sum() > 0


def test_per_expert_loop_fallback_matches_grouped_mm(monkeypatch):
    ex = GroupedExperts(4, 16, 8)
    torch.nn.init.normal_(ex.w1), torch.nn.init.normal_(ex.w2), torch.nn.init.normal_(ex.w3)
    x, counts = torch.randn(20, 16), torch.tensor([5, 0, 12, 3])
    fast = ex(x, counts)
    monkeypatch.setattr("model.moe._grouped_mm_supported", lambda x: False)
    torch.testing.assert_close(ex(x, counts), fast, rtol=1e-5, atol=1e-5)


def test_router_losses():
    moe = make_moe(1, n_experts=4)
    logits = torch.zeros(8, 4)
    balanced = moe.router_losses(logits, torch.tensor([2, 2, 2, 2]))
    skewed = moe.router_losses(torch.tensor([[5.0, 0, 0, 0]] * 8), torch.tensor([8, 0, 0, 0]))
    assert balanced[0].item() == pytest.approx(1.0)  # the switch loss is 1 when balanced
    assert skewed[0] > balanced[0] and skewed[1] > balanced[1]
