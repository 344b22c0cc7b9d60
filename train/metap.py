"""MetaP: per-parameter init scales and AdamW hyper-parameters that carry a learning rate tuned
on a small proxy over to a wider and deeper model (`optim.metap=true`).

Meta did not publish MetaP; this is the public equivalent, muP for Adam (Tensor Programs V)
with CompleteP's depth rule (arXiv 2505.01618), in the form OLMo-core's and EleutherAI's
nanoGPT-mup implementations use. Every parameter is classified by its name (FSDP loses tensor
attributes, so nothing is stored on the tensors) and gets multipliers relative to the base
shapes in `model.metap_base` (a proxy's shapes; null: the model's own, multiplier 1):

| class | examples | init std | LR | weight decay | Adam eps |
|---|---|---|---|---|---|
| embedding | tok_embeddings | s | lr | wd | eps |
| hidden, fan-in ratio m | wq/wk/wv, router, w1/w3 (dense, shared, experts): m = dim ratio; wo: heads ratio; w2: ffn / expert hidden ratio | s / sqrt(m) | lr / m | wd x m | eps / m |
| output | output head | s | lr | wd | eps |
| norm | RMSNorm gains | 1 | lr | 0 | eps |
| vision | the vision encoder and its projector (own width, not scaled) | as in SP | lr | wd | eps |

and two forward multipliers in ModelArgs: logits x 1 / (dim ratio) (muP's readout) and every
residual branch x base n_layers / n_layers (CompleteP, alpha = 1; its hidden-LR depth factor is
then 1). Weight decay x m keeps lr x wd, the AdamW timescale, the same at every width. The
out-projections (wo, w2) keep herd's depth factor 1 / sqrt(2 x base n_layers). At the base
shapes every multiplier is 1: MetaP equals the standard parametrisation there, bit for bit.
head_dim is held fixed across widths (heads scale), so attention keeps 1 / sqrt(head_dim).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

import torch
from torch import nn

from model import ModelArgs

# Wrappers that parallel/ may put around blocks change parameter names; classification ignores them.
_WRAPPERS = re.compile(r"(_checkpoint_wrapped_module|_orig_mod|_fsdp_wrapped_module)\.")

# (class, fan-in width) by the end of a parameter's name, first match wins.
_RULES = [
    (r"^tok_embeddings\.weight$", "embedding", None),
    (r"^output\.weight$", "output", None),
    (r"^vision\.", "vision", None),
    (r"norm\.weight$", "norm", None),
    (r"attention\.w[qkv]\.weight$", "hidden", "dim"),
    (r"attention\.wo\.weight$", "hidden", "heads"),
    (r"feed_forward\.router\.weight$", "hidden", "dim"),
    (r"feed_forward\.(shared_expert\.)?w[13]\.weight$", "hidden", "dim"),
    (r"feed_forward\.experts\.w[13]$", "hidden", "dim"),
    (r"feed_forward\.w2\.weight$", "hidden", "ffn"),
    (r"feed_forward\.(shared_expert\.w2\.weight|experts\.w2)$", "hidden", "expert"),
]
_RULES = [(re.compile(p), c, w) for p, c, w in _RULES]
_OUT_PROJECTIONS = re.compile(r"(attention\.wo\.weight|w2\.weight|experts\.w2)$")


def classify(name: str) -> tuple[str, str | None]:
    """(class, fan-in width) of a parameter by name; raises for a name no rule knows, so a new
    parameter cannot silently train at the wrong rate."""
    name = _WRAPPERS.sub("", name)
    for pattern, cls, width in _RULES:
        if pattern.search(name):
            return cls, width
    raise ValueError(f"MetaP has no rule for parameter {name!r}: add one to train/metap.py")


def width_ratios(args: ModelArgs) -> dict[str, float]:
    """Each width's ratio to the base shape: dim, heads (attention width), ffn and expert hidden."""
    b = args.metap_base
    ratio = lambda value, base: value / base if base else 1.0  # noqa: E731
    return {"dim": ratio(args.dim, b.dim), "heads": ratio(args.n_heads, b.n_heads),
            "ffn": ratio(args.ffn_hidden, b.ffn_hidden), "expert": ratio(args.expert_hidden, b.expert_hidden)}


def base_layers(args: ModelArgs) -> int:
    return args.metap_base.n_layers or args.n_layers


def with_multipliers(args: ModelArgs) -> ModelArgs:
    """`args` with MetaP's forward multipliers set from the base shapes."""
    if args.tie_embeddings:
        raise ValueError("optim.metap=true needs model.tie_embeddings=false: the output head is scaled "
                         "unlike the embedding")
    return replace(args, logit_multiplier=1.0 / width_ratios(args)["dim"],
                   residual_multiplier=base_layers(args) / args.n_layers)


@dataclass(frozen=True)
class Multipliers:
    init_std: float  # absolute std (0: the norm's ones)
    lr: float
    weight_decay: float
    eps: float


def multipliers(name: str, param: torch.Tensor, args: ModelArgs) -> Multipliers:
    """The init std and the AdamW multipliers of one parameter (the module docstring's table)."""
    cls, width = classify(name)
    s = args.init_std
    if cls == "norm" or param.dim() < 2:
        return Multipliers(0.0, 1.0, 0.0, 1.0)
    if cls != "hidden":
        return Multipliers(s, 1.0, 1.0, 1.0)
    m = width_ratios(args)[width]
    std = s / math.sqrt(m)
    if _OUT_PROJECTIONS.search(name):
        std /= math.sqrt(2 * base_layers(args))
    return Multipliers(std, 1.0 / m, m, 1.0 / m)


def standard_std(name: str, args: ModelArgs) -> float:
    """What `Transformer.init_weights` gives a text-model matrix."""
    std = args.init_std
    return std / math.sqrt(2 * args.n_layers) if _OUT_PROJECTIONS.search(_WRAPPERS.sub("", name)) else std


@torch.no_grad()
def init_weights(model: nn.Module, args: ModelArgs) -> None:
    """MetaP's init of the text model's matrices, after `Transformer.init_weights` (which set the
    norms, buffers and the vision encoder). Only matrices whose std differs are drawn again, so
    at the base shapes the weights are bitwise the standard ones."""
    for name, p in model.named_parameters():
        mult = multipliers(name, p, args)
        if mult.init_std > 0 and classify(name)[0] != "vision" and mult.init_std != standard_std(name, args):
            nn.init.normal_(p, std=mult.init_std)


def param_groups(model: nn.Module, args: ModelArgs, lr: float, weight_decay: float, eps: float) -> list[dict]:
    """AdamW groups, one per set of multipliers; the first group is at the base LR (the one the
    schedule logs). Each group records its `lr_multiplier`."""
    groups: dict[tuple[float, float, float], list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            m = multipliers(name, p, args)
            groups.setdefault((m.lr, m.weight_decay, m.eps), []).append(p)
    keys = sorted(groups, key=lambda k: (k[0] != 1.0, k))
    return [{"params": groups[k], "lr": lr * k[0], "weight_decay": weight_decay * k[1], "eps": eps * k[2],
             "lr_multiplier": k[0]} for k in keys]


# ---------------------------------------------------------------- beyond width


@dataclass(frozen=True)
class Transfer:
    lr: float
    weight_decay: float


def transfer(lr: float, weight_decay: float, *, proxy_batch_tokens: int, proxy_tokens: int, batch_tokens: int,
             tokens: int, horizon_exponent: float = 0.0) -> Transfer:
    """Carry AdamW's lr and weight decay, tuned on a proxy run, to a run with another global batch
    (tokens per optimizer step) and horizon (tokens in all); width and depth are MetaP's part.

    - Batch: lr x sqrt(batch ratio), the square-root rule for Adam (Malladi et al., "On the SDEs
      and scaling rules for adaptive gradient algorithms", NeurIPS 2022); it holds below the
      critical batch size, not beyond it.
    - Horizon: lr x (token ratio)^-horizon_exponent, the power law of Bjorck et al. ("Scaling
      optimal LR across token horizons", ICLR 2025), whose exponent depends on the model and data:
      fit it from proxy sweeps at two horizons (launch/sweep_report.py); 0 leaves lr alone.
    - Weight decay: the AdamW timescale tau = batch / (lr x wd x tokens), a fraction of the run,
      held constant (Wang and Aitchison, arXiv 2505.13738), given the transferred lr."""
    for name, value in (("lr", lr), ("proxy_batch_tokens", proxy_batch_tokens), ("proxy_tokens", proxy_tokens),
                        ("batch_tokens", batch_tokens), ("tokens", tokens)):
        if value <= 0:
            raise ValueError(f"{name}={value} must be positive")
    if weight_decay < 0:
        raise ValueError(f"weight_decay={weight_decay} must be >= 0")
    batch, horizon = batch_tokens / proxy_batch_tokens, tokens / proxy_tokens
    new_lr = lr * math.sqrt(batch) * horizon ** -horizon_exponent
    # tau = B / (lr * wd * D) kept: wd' = wd * (lr / lr') * (B' / B) * (D / D').
    new_wd = weight_decay * (lr / new_lr) * batch / horizon
    return Transfer(new_lr, new_wd)
