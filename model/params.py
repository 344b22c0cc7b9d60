"""Parameter counts per component, total and active per token (routed experts count top_k of
n_experts). The vision encoder counts in the total but not as active: it runs once per image
tile, not per text token (Meta's published active counts are the decoder's). Works on the meta
device, so the largest presets are counted without memory."""
from __future__ import annotations

from collections import OrderedDict

from torch import nn

COMPONENTS = ("embedding", "attention", "router", "routed experts", "shared expert", "dense ffn", "norms",
              "output", "vision")


def component_of(name: str) -> str:
    if name.startswith("tok_embeddings"):
        return "embedding"
    if name.startswith("output"):
        return "output"
    if name.startswith("vision."):
        return "vision"
    if ".attention." in name:
        return "attention"
    if "norm" in name:
        return "norms"
    if ".router." in name:
        return "router"
    if ".experts." in name:
        return "routed experts"
    if ".shared_expert." in name:
        return "shared expert"
    return "dense ffn"


def count_parameters(model: nn.Module) -> "OrderedDict[str, tuple[int, int]]":
    """{component: (total, active)}; tied weights are counted once."""
    args = model.args
    counts = OrderedDict((c, [0, 0]) for c in COMPONENTS)
    for name, p in model.named_parameters():  # named_parameters skips tied duplicates
        c = component_of(name)
        n = p.numel()
        counts[c][0] += n
        if c == "routed experts":
            counts[c][1] += n * args.top_k // args.n_experts
        elif c != "vision":
            counts[c][1] += n
    return OrderedDict((c, (t, a)) for c, (t, a) in counts.items() if t)
