"""The distillation loss: hard cross-entropy on the labels plus the temperature-scaled KL
divergence from the teacher's distribution to the student's, computed token chunk by token
chunk from the two models' final hidden states, so that neither model's logits over the whole
micro-batch exist at once (at 16K tokens and Llama 4's 202K vocabulary they would be ~13 GB a
model in fp32).

Per target token t (labels != -100), with p = softmax(z / tau):

    loss_t = (1 - w_t) x CE(z_student, label) + w_t x tau^2 x KL(p_teacher || p_student)

summed over the micro-batch and divided by the global target count, like the plain CE (the tau^2
keeps the soft gradient's size independent of tau, Hinton et al. 2015). The weight w is the
schedule's value for the step or a per-token tensor ("dynamic weighting"). Each chunk's logits
are recomputed in backward (activation checkpointing per chunk): memory is O(chunk x vocab).

Teacher targets come in three forms:
- `logits` of an online teacher (its hidden states and output head): the exact KL;
- `topk`: the teacher's k most likely tokens and their probabilities at temperature 1; the KL is
  taken over those k tokens with the probabilities tempered (q^(1/tau)) and renormalised (biased
  when the k tokens do not cover the teacher's support; k = vocab is the exact KL);
- `sampled`: tokens drawn from the teacher's tempered distribution with their weights; the soft
  term is the weighted mean of -log p_student(token) x tau^2, an unbiased estimate of the
  cross-entropy to the teacher (the KL up to the teacher's entropy, which has no gradient).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


@dataclass
class TeacherTargets:
    """One of: `hidden` + `head` (online), `ids` + `probs` (topk: probabilities; sampled: counts
    or weights per drawn token, summing to 1 per position). ids/probs are [N, k]."""

    kind: str  # logits | topk | sampled
    hidden: torch.Tensor | None = None  # [N, D_teacher]
    head: Callable[[torch.Tensor], torch.Tensor] | None = None  # hidden -> logits
    ids: torch.Tensor | None = None
    probs: torch.Tensor | None = None

    def __post_init__(self):
        if self.kind not in ("logits", "topk", "sampled"):
            raise ValueError(f"teacher targets kind={self.kind!r} is not one of logits, topk, sampled")

    def chunk(self, sl: slice) -> TeacherTargets:
        pick = lambda t: None if t is None else t[sl]  # noqa: E731
        return TeacherTargets(self.kind, pick(self.hidden), self.head, pick(self.ids), pick(self.probs))


@dataclass
class DistillSums:
    loss: torch.Tensor  # differentiable: sum over the targets of the weighted per-token loss
    hard: torch.Tensor  # detached: CE summed over the targets
    soft: torch.Tensor  # detached: tau^2 x KL (or its sampled estimate) summed over the targets


def _chunk_terms(h, labels, weight, targets: TeacherTargets, head, temperature: float):
    """Per-token (hard CE, soft term) of one chunk, both [n]; positions without a target give 0."""
    z = head(h).float()
    valid = labels != IGNORE_INDEX
    hard = F.cross_entropy(z, labels.clamp(min=0), reduction="none") * valid
    log_p = F.log_softmax(z / temperature, dim=-1)
    if targets.kind == "logits":
        with torch.no_grad():
            log_q = F.log_softmax(targets.head(targets.hidden).float() / temperature, dim=-1)
        soft = (log_q.exp() * (log_q - log_p)).sum(-1)
    else:
        log_p_k = log_p.gather(-1, targets.ids)
        q = targets.probs.float()
        if targets.kind == "topk":  # probabilities at temperature 1, tempered here: q^(1/tau), renormalised
            q = q.clamp(min=0) ** (1.0 / temperature) if temperature != 1.0 else q
            q = q / q.sum(-1, keepdim=True)
            soft = (q * (q.clamp(min=1e-30).log() - log_p_k)).sum(-1)
        else:
            soft = -(q * log_p_k).sum(-1)
    soft = soft * temperature**2 * valid
    return hard, soft, (1 - weight) * hard + weight * soft


def distillation_sums(hidden: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor], labels: torch.Tensor,
                      targets: TeacherTargets, *, temperature: float = 1.0, weight: float | torch.Tensor = 0.5,
                      chunk_size: int = 4096) -> DistillSums:
    """The summed losses of one micro-batch: hidden [N, D] (the student's final normed hidden
    states), head the student's output layer, labels [N], per-token `weight` [N] or a float."""
    if temperature <= 0:
        raise ValueError(f"distill.temperature={temperature} must be positive")
    n = hidden.shape[0]
    weight = torch.as_tensor(weight, dtype=torch.float32, device=hidden.device).expand(n)
    loss = hidden.new_zeros((), dtype=torch.float32)
    hard_sum = torch.zeros((), dtype=torch.float64, device=hidden.device)
    soft_sum = torch.zeros((), dtype=torch.float64, device=hidden.device)
    for start in range(0, n, chunk_size):
        sl = slice(start, min(n, start + chunk_size))
        part = targets.chunk(sl)

        def terms(h, part=part, sl=sl):
            return _chunk_terms(h, labels[sl], weight[sl], part, head, temperature)

        if hidden.requires_grad:  # recompute the chunk's logits in backward instead of keeping them
            hard, soft, total = checkpoint(terms, hidden[sl], use_reentrant=False)
        else:
            hard, soft, total = terms(hidden[sl])
        loss = loss + total.sum()
        hard_sum += hard.detach().double().sum()
        soft_sum += soft.detach().double().sum()
    return DistillSums(loss, hard_sum, soft_sum)


def soft_weight(step: int, total_steps: int, start: float, end: float) -> float:
    """A linear schedule of the soft-target weight from `start` to `end` over the run (Llama 4
    weighted soft and hard targets dynamically over training; the curve is not published)."""
    if total_steps <= 1:
        return end
    return start + (end - start) * min(max(step, 0), total_steps - 1) / (total_steps - 1)
