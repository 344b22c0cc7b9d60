"""Distillation from an online teacher: sharded over 2 gloo ranks it computes the unsharded
teacher's logits, stays bitwise frozen through training and holds no gradients or optimizer
state; a run with a teacher resumes bitwise; and on a synthetic language whose true next-token
distribution is known, distillation brings a student closer to it than the labels alone, with
sampled targets close behind and a truncated top-k visibly biased."""
import json
import os
import shutil

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import compose, run_ranks

pytestmark = pytest.mark.xdist_group("train_test_teacher")  # its module fixtures: built once

TEXT = ["+model=tiny", "model.vision.enabled=false", "data=text", "train.seq_len=64", "train.batch_size=2",
        "logging.wandb.mode=disabled", "model.router_aux_loss_coef=0"]


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    from train.loop import train

    run_dir = str(tmp_path_factory.mktemp("teacher") / "run")
    train(compose(TEXT + ["train.steps=4", f"run.dir={run_dir}", "train.seed=7"]))
    return run_dir


def _frozen_and_exact(teacher_dir, run_dir):
    import torch.distributed as dist

    from train.loop import Trainer
    from train.teacher import Teacher

    trainer = Trainer(compose(TEXT + ["train.steps=3", f"run.dir={run_dir}", f"distill.teacher={teacher_dir}"]))
    teacher = trainer.teacher
    full = lambda t: (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()  # noqa: E731
    before = {n: full(p) for n, p in teacher.model.named_parameters()}
    batch = next(iter(trainer.state.data))
    sharded = teacher.targets(batch, trainer.env.device, None)
    logits = teacher.head(sharded.hidden)
    trainer.run()
    after = {n: full(p) for n, p in teacher.model.named_parameters()}
    optimized = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    # the same teacher, unsharded, in this process
    whole = Teacher(teacher_dir, trainer.args, trainer.cfg.parallel, trainer.env, None)
    reference = whole.head(whole.targets(batch, trainer.env.device, None).hidden)
    dist.barrier()
    return {
        "logits_err": ((logits - reference).abs().max() / reference.abs().max()).item(),
        "unchanged": all(torch.equal(before[n], after[n]) for n in before),
        "no_grads": all(p.grad is None and not p.requires_grad for p in teacher.model.parameters()),
        "not_optimized": not any(id(p) in optimized for p in teacher.model.parameters()),
        "soft": _first_row(run_dir).get("loss_soft"),
    }


def _first_row(run_dir: str) -> dict:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return json.loads(f.readline())


def test_sharded_teacher_is_exact_and_frozen(teacher_run, tmp_path):
    for r in run_ranks(_frozen_and_exact, 2, teacher_run, str(tmp_path / "student")):
        assert r["logits_err"] < 1e-5 and r["unchanged"] and r["no_grads"] and r["not_optimized"], r
        assert r["soft"] is not None and r["soft"] > 0


def test_distillation_run_resumes_bitwise(teacher_run, tmp_path):
    """The step-2 checkpoint of a 4-step run, alone in a new run directory (as if the run had been
    killed after it), resumes to the uninterrupted run's last two steps, soft losses included."""
    from train.loop import train

    common = TEXT + [f"distill.teacher={teacher_run}", "distill.temperature=2", "distill.weight=0.8",
                     "distill.weight_end=0.2", "checkpoint.interval=2", "train.steps=4"]
    whole = [(r["loss"], r["loss_soft"]) for r in train(compose(common + [f"run.dir={tmp_path}/a"]))]
    shutil.copytree(tmp_path / "a" / "checkpoints" / "step-00000002", tmp_path / "b" / "checkpoints" / "step-00000002")
    resumed = train(compose(common + [f"run.dir={tmp_path}/b"]))
    assert [(r["step"], r["loss"], r["loss_soft"]) for r in resumed] == [(3, *whole[2]), (4, *whole[3])]


def test_a_teacher_with_another_vocabulary_is_refused(teacher_run, tmp_path):
    from train.loop import train

    with pytest.raises(ValueError, match="vocab_size 4352 but the student has 5000"):
        train(compose(TEXT + ["model.vocab_size=5000", "train.steps=1", f"run.dir={tmp_path}/x",
                              f"distill.teacher={teacher_run}"]))
    with pytest.raises(FileNotFoundError, match="distill.teacher='/nowhere'"):
        train(compose(TEXT + ["train.steps=1", f"run.dir={tmp_path}/y", "distill.teacher=/nowhere"]))


# ---------------------------------------------------------------- learning a known language


def _bigram(vocab: int, support: int, seed: int = 0) -> torch.Tensor:
    """A next-token table [vocab, vocab]: each token is followed by one of `support` tokens."""
    g = torch.Generator().manual_seed(seed)
    table = torch.zeros(vocab, vocab)
    for t in range(vocab):
        nxt = torch.randperm(vocab, generator=g)[:support]
        table[t, nxt] = torch.rand(support, generator=g) + 0.2
    return table / table.sum(1, keepdim=True)


def _train_student(truth, mode: str, steps: int = 150, seed: int = 0) -> float:
    """A one-layer student (embedding -> MLP -> head) trained on sampled text; returns its held-out
    KL to the true next-token distribution."""
    from train.distill import TeacherTargets, distillation_sums

    V = truth.shape[0]
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    emb, mlp, head = torch.nn.Embedding(V, 32), torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(),
                                                                    torch.nn.Linear(64, 32)), torch.nn.Linear(32, V)
    params = [*emb.parameters(), *mlp.parameters(), *head.parameters()]
    opt = torch.optim.Adam(params, lr=1e-2)
    for _ in range(steps):
        x = torch.randint(0, V, (64,), generator=g)
        y = torch.multinomial(truth[x], 1, generator=g).squeeze(1)
        h = mlp(emb(x))
        q = truth[x]
        if mode == "ce":
            loss = F.cross_entropy(head(h), y)
        else:
            if mode == "full":
                targets = TeacherTargets("logits", hidden=q.log(), head=lambda z: z)
            elif mode == "sampled":
                ids = torch.multinomial(q, 12, replacement=True, generator=g)
                targets = TeacherTargets("sampled", ids=ids, probs=torch.full(ids.shape, 1 / 12))
            else:  # truncated top-k: fewer tokens than the support
                probs, ids = q.topk(2, dim=-1)
                targets = TeacherTargets("topk", ids=ids, probs=probs)
            loss = distillation_sums(h, head, y, targets, weight=1.0).loss / len(x)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        x = torch.arange(V)
        log_p = F.log_softmax(head(mlp(emb(x))), -1)
        q = truth[x]
        return (q * (q.clamp(min=1e-30).log() - log_p)).sum(-1).mean().item()


def test_distillation_learns_a_known_language_better_than_labels():
    truth = _bigram(48, 4)
    ce, full, sampled, truncated = (_train_student(truth, m) for m in ("ce", "full", "sampled", "truncated"))
    assert full < 0.6 * ce, (ce, full)
    assert sampled < ce and sampled < full + 0.5 * (ce - full), (ce, full, sampled)
    assert truncated > 2 * full, (full, truncated)  # the top-2 targets miss half the support: biased


# ---------------------------------------------------------------- cached targets


def test_cached_targets_train_like_the_online_teacher_and_resume(teacher_run, tmp_path):
    """Top-k targets over the whole vocabulary, cached once, give the online run's losses (fp16
    probabilities: 1e-3); the cache script is resumable; a batch it never saw is a clear error."""
    from launch.cache_teacher import cache_targets
    from train.loop import train

    common = TEXT + ["train.steps=3", "distill.temperature=2", "distill.weight=0.7"]
    online = train(compose(common + [f"run.dir={tmp_path}/online", f"distill.teacher={teacher_run}"]))
    cache = ["distill.cache_kind=topk", "distill.cache_k=4352", f"distill.cache={tmp_path}/cache"]
    assert cache_targets(compose(common + [f"distill.teacher={teacher_run}", *cache])) == 3
    assert cache_targets(compose(common + [f"distill.teacher={teacher_run}", *cache])) == 0  # all there already
    cached = train(compose(common + [f"run.dir={tmp_path}/cached", *cache]))
    for a, b in zip(online, cached):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)  # the hard CE does not use the teacher
        assert b["loss_soft"] == pytest.approx(a["loss_soft"], rel=1e-3)
    with pytest.raises(FileNotFoundError, match="has no targets for this batch"):
        train(compose(common + [f"run.dir={tmp_path}/other", "train.seed=5", *cache]))
