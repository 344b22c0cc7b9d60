"""The distillation loss (train/distill.py): zero KL and zero soft gradient when student and
teacher agree, the analytic gradient, top-k with k = vocab equal to the exact KL, chunked equal
to unchunked, and the sampled form's relation to the KL."""
import pytest
import torch
import torch.nn.functional as F

from train.distill import TeacherTargets, distillation_sums, soft_weight

V, D, N = 50, 16, 37


def _setup(seed=0):
    g = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(D, V, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, D, generator=g))
    teacher_head = torch.nn.Linear(D, V, bias=False)
    with torch.no_grad():
        teacher_head.weight.copy_(torch.randn(V, D, generator=g))
    hidden = torch.randn(N, D, generator=g)
    t_hidden = torch.randn(N, D, generator=g)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[::5] = -100
    return head, teacher_head, hidden, t_hidden, labels


def test_student_equal_to_teacher_gives_zero_kl_and_zero_soft_gradient():
    head, _, hidden, _, labels = _setup()
    h = hidden.clone().requires_grad_()
    out = distillation_sums(h, head, labels, TeacherTargets("logits", hidden=hidden, head=head), temperature=2.0,
                            weight=1.0)
    out.loss.backward()
    assert abs(out.soft.item()) < 1e-9
    assert h.grad.abs().max() < 1e-6 and head.weight.grad.abs().max() < 1e-6


def test_gradient_is_the_analytic_one():
    # hidden = logits (identity head): d/dz [tau^2 KL(q || softmax(z / tau))] = tau (softmax(z / tau) - q)
    tau = 1.7
    g = torch.Generator().manual_seed(1)
    z = torch.randn(N, V, generator=g, dtype=torch.float64).float().requires_grad_()
    zt = torch.randn(N, V, generator=g)
    labels = torch.randint(0, V, (N,), generator=g)
    out = distillation_sums(z, lambda h: h, labels, TeacherTargets("logits", hidden=zt, head=lambda h: h),
                            temperature=tau, weight=1.0, chunk_size=8)
    out.loss.backward()
    expected = tau * (F.softmax(z.detach() / tau, -1) - F.softmax(zt / tau, -1))
    assert torch.allclose(z.grad, expected, atol=1e-5)


def test_topk_over_the_whole_vocabulary_is_the_exact_kl():
    head, teacher_head, hidden, t_hidden, labels = _setup()
    exact = distillation_sums(hidden, head, labels, TeacherTargets("logits", hidden=t_hidden, head=teacher_head),
                              temperature=1.0, weight=0.7)
    q = F.softmax(teacher_head(t_hidden), -1).detach()
    probs, ids = q.topk(V, dim=-1)
    topk = distillation_sums(hidden, head, labels, TeacherTargets("topk", ids=ids, probs=probs), temperature=1.0,
                             weight=0.7)
    assert topk.soft.item() == pytest.approx(exact.soft.item(), rel=1e-6)
    assert topk.loss.item() == pytest.approx(exact.loss.item(), rel=1e-6)
    # a truncated top-k is a different (biased) target
    probs2, ids2 = q.topk(2, dim=-1)
    truncated = distillation_sums(hidden, head, labels, TeacherTargets("topk", ids=ids2, probs=probs2))
    assert abs(truncated.soft.item() - exact.soft.item()) > 1e-2 * abs(exact.soft.item())


def test_chunked_equals_unchunked():
    head, teacher_head, hidden, t_hidden, labels = _setup()
    weights = torch.linspace(0, 1, N)
    results = []
    for chunk in (5, 10**6):
        head.zero_grad()
        h = hidden.clone().requires_grad_()
        out = distillation_sums(h, head, labels, TeacherTargets("logits", hidden=t_hidden, head=teacher_head),
                                temperature=2.0, weight=weights, chunk_size=chunk)
        out.loss.backward()
        results.append((out.loss.detach(), out.hard, out.soft, h.grad.clone(), head.weight.grad.clone()))
    for a, b in zip(*results):  # fp32 sums in another order: <= 1e-6 of the largest entry
        assert (a.double() - b.double()).abs().max() <= 1e-6 * b.double().abs().max()


def test_sampled_targets_are_the_cross_entropy_to_the_teacher():
    head, teacher_head, hidden, t_hidden, labels = _setup()
    q = F.softmax(teacher_head(t_hidden), -1).detach()
    exact = distillation_sums(hidden, head, labels, TeacherTargets("logits", hidden=t_hidden, head=teacher_head))
    ids = torch.arange(V).expand(N, V)  # every token, weighted by its probability: the expectation itself
    sampled = distillation_sums(hidden, head, labels, TeacherTargets("sampled", ids=ids, probs=q))
    entropy = -(q * q.log()).sum(-1)[labels != -100].sum()
    assert sampled.soft.item() == pytest.approx(exact.soft.item() + entropy.item(), rel=1e-5)


def test_bad_values_are_named():
    head, _, hidden, _, labels = _setup()
    with pytest.raises(ValueError, match="temperature=0"):
        distillation_sums(hidden, head, labels, TeacherTargets("logits", hidden=hidden, head=head), temperature=0)
    with pytest.raises(ValueError, match="kind='soft'"):
        TeacherTargets("soft")
    assert soft_weight(0, 11, 0.9, 0.1) == 0.9 and soft_weight(10, 11, 0.9, 0.1) == pytest.approx(0.1)
