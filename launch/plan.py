"""Build a model preset on the meta device and print its parameters per component; with
plan.gpus=N, also what each of N GPUs would hold (train/memory.py's estimate) for the layout the
overrides give, and whether it fits.

    python launch/plan.py +model=scout [model.FIELD=VALUE ...]
    python launch/plan.py +model=scout plan.gpus=64 plan.gpu=h100 parallel.activation_checkpointing=true

Takes the same Hydra overrides as launch/pretrain.py and builds nothing but meta tensors.
"""
from __future__ import annotations

import argparse
import os
import sys

import hydra
import torch
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from model import ModelArgs, Transformer  # noqa: E402
from model.params import count_parameters  # noqa: E402
from train.config import model_args, register_configs, validate  # noqa: E402
from train.cost import matmul_flops, search_layouts, step_cost  # noqa: E402
from train.memory import GPUS, estimate_memory, fsdp_ranks_needed, gib, layout_of  # noqa: E402

register_configs()


def _short(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def plan(args: ModelArgs) -> dict:
    with torch.device("meta"):
        model = Transformer(args)
    counts = count_parameters(model)
    width = max(len(c) for c in counts)
    print(f"{'component':<{width}}  {'total':>16}  {'active':>16}")
    for c, (total, active) in counts.items():
        print(f"{c:<{width}}  {total:>16,}  {active:>16,}")
    total = sum(t for t, _ in counts.values())
    active = sum(a for _, a in counts.values())
    print(f"{'all':<{width}}  {total:>16,}  {active:>16,}")
    print(f"{'':<{width}}  {_short(total):>16}  {_short(active):>16}")
    return {"total": total, "active": active, "components": counts}


def plan_cluster(cfg, preset: str = "<preset>") -> bool:
    """Print the per-GPU estimate of this config on plan.gpus GPUs of kind plan.gpu; True if it fits."""
    if cfg.plan.gpu not in GPUS:
        raise ValueError(f"plan.gpu={cfg.plan.gpu!r} is not one of {', '.join(GPUS)}")
    if cfg.plan.gpus < 1:
        raise ValueError(f"plan.gpus={cfg.plan.gpus} must be positive")
    phases = validate(cfg)
    size, fits = GPUS[cfg.plan.gpu], True
    for phase in phases:
        layout = layout_of(cfg, cfg.plan.gpus, "cuda", phase)
        estimate = estimate_memory(phase.model, layout, "cuda")
        print(f"\n{cfg.plan.gpus} x {cfg.plan.gpu} ({gib(size)} each), phase {phase.name}: seq_len {phase.seq_len}, "
              f"batch {layout.batch_size}, FSDP over {layout.dp_shard}, ep {layout.ep}, cp {layout.cp}, "
              f"activation checkpointing {'on' if layout.activation_checkpointing else 'off'}"
              + (", all-to-alls exchanged again in recomputation" if layout.activation_checkpointing
                 and layout.ep > 1 and not layout.replay_exchanges else ""))
        print(estimate.table())
        cost = step_cost(phase.model, layout, cfg.plan.gpu)
        print(describe(cost))
        if cfg.plan.trace:
            print(traced(phase.model, layout, cfg.parallel, estimate, cost))
        if estimate.total > size:
            fits = False
            print(f"  does not fit; the largest parts: {', '.join(advice(estimate, layout, size, phase.model))}")
        else:
            print(f"  fits, {gib(size - estimate.total)} to spare")
        ranked = search_layouts(phase.model, layout, cfg.plan.gpu)
        if not ranked:
            print(f"  no layout herd has (FSDP/HSDP, ep, cp, activation checkpointing) fits {phase.model.dim}-wide "
                  f"{phase.seq_len}-token rows of batch {layout.batch_size} on {cfg.plan.gpus} x {cfg.plan.gpu}: "
                  "more GPUs, shorter rows, or parallelism herd does not have (tensor or pipeline parallel)")
            continue
        print("  layouts that fit, fastest first (predicted):")
        for c in ranked[:5]:
            print(f"    {c.tokens_per_s:>9,.0f} tok/s/GPU  MFU {c.mfu:5.1%}  {gib(c.memory):>10}  {overrides(c.layout)}")
        print(f"  launch the best: torchrun --nnodes={max(1, cfg.plan.gpus // 8)} --nproc_per_node={min(8, cfg.plan.gpus)} "
              f"... launch/pretrain.py +model={preset} {overrides(ranked[0].layout)}")
    return fits


def overrides(layout) -> str:
    return (f"parallel.dp_shard={layout.dp_shard} parallel.dp_replicate={layout.world_size // layout.dp_shard} "
            f"parallel.ep={layout.ep} parallel.cp={layout.cp} "
            f"parallel.activation_checkpointing={str(layout.activation_checkpointing).lower()}"
            + ("" if layout.replay_exchanges else " parallel.replay_exchanges=false"))


def describe(cost) -> str:
    comm = ", ".join(f"{name} {gib(b)}" for name, b in cost.bytes.items())
    return (f"  per micro-batch: {cost.flops / 1e12:,.1f} TFLOP; {comm}\n"
            f"  predicted: compute {cost.compute_s:.2f} s, communication {cost.comm_s:.2f} s, step {cost.step_s:.2f} s, "
            f"{cost.tokens_per_s:,.0f} tokens/s per GPU, MFU {cost.mfu:.1%} (train/cost.py's model)")


def traced(args: ModelArgs, layout, parallel, estimate, cost) -> str:
    """One step of the real code at this layout (train/trace.py), beside the estimate."""
    from train.trace import trace_step

    if layout.cp > 1:
        return "  trace: not run (context parallelism is not traced); the estimate stands"
    try:
        t = trace_step(args, layout, parallel)
    except RuntimeError as e:  # the trace's own failure; the estimate above stands
        return f"  trace failed, the estimate stands: {str(e).strip().splitlines()[-1]}"

    def ratio(a, b) -> str:
        return f"{a / b:.3f}x" if b else "-"

    state = (f"    parameters, gradients, AdamW state  {gib(t.sharded_state):>10}   estimate "
             f"{gib(estimate.sharded_state)} ({ratio(t.sharded_state, estimate.sharded_state)})")
    lines = [f"  traced: one step of herd's code on {layout.world_size} fake ranks, rank 0's view ({t.seconds:.0f} s):",
             state]
    mm = matmul_flops(args, layout)
    lines.append(f"    matmul FLOPs                        {t.flops / 1e12:>7,.1f} T   estimate {mm / 1e12:,.1f} T"
                 f" ({ratio(t.flops, mm)}; attention kernels are not counted on this path)")
    for kind in sorted(set(t.bytes) | set(cost.bytes)):
        got, want = t.bytes.get(kind, 0), cost.bytes.get(kind, 0)
        lines.append(f"    {kind:<35} {gib(got):>10}   estimate {gib(want)} ({ratio(got, want)})")
    if t.peak:
        p = t.peak
        lines.append(f"    peak memory (FSDPMemTracker)        {gib(p['total']):>10}   estimate {gib(estimate.total)}"
                     f" ({ratio(p['total'], estimate.total)}; docs/scale.md)")
        parts = {"parameters": p.get("sharded_param", 0) + p.get("unsharded_param", 0) + p.get("buffer", 0),
                 "gradients": p.get("sharded_grad", 0) + p.get("unsharded_grad", 0), "optimizer": p.get("opt", 0),
                 "activations": p.get("act", 0), "made in backward": p.get("temp", 0),
                 "collective buffers": p.get("all_gather", 0) + p.get("reduce_scatter", 0)}
        lines.append("      at the peak: " + ", ".join(f"{name} {gib(b)}" for name, b in parts.items()))
    return "\n".join(lines)


def advice(estimate, layout, size: int, args: ModelArgs) -> list[str]:
    """What to change, largest part first."""
    parts = {"sharded": estimate.sharded_state, "gathered": estimate.gathered_weights,
             "activations": estimate.activations + estimate.logits}
    out = []
    for part in sorted(parts, key=parts.get, reverse=True):
        if part == "sharded" and (needed := fsdp_ranks_needed(estimate, layout, size)):
            out.append(f"the sharded state needs at least {needed} GPUs")
        elif part == "gathered" and args.n_experts > layout.ep:
            out.append(f"gathered MoE blocks ({gib(estimate.block_weights)} in flight): raise parallel.ep "
                       f"(now {layout.ep}) so experts are gathered among fewer ranks")
        elif part == "activations" and parts[part] > size / 4:
            out.append(("" if layout.activation_checkpointing else "parallel.activation_checkpointing=true, ")
                       + "parallel.cp, or a smaller train.batch_size / seq_len for the activations")
    return out or ["more GPUs"]


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="Hydra overrides, as for launch/pretrain.py (+model=NAME first)")
    overrides = parser.parse_args(argv).overrides
    # The compose API reads the same configs as pretrain.py without creating a run directory.
    config_dir = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
    try:
        with hydra.initialize_config_dir(config_dir=config_dir, version_base="1.3"):
            cfg = hydra.compose("pretrain", overrides=overrides)
        if OmegaConf.is_missing(cfg, "model"):
            raise SystemExit("choose a model preset: python launch/plan.py +model=tiny|scout|maverick|behemoth")
        plan(model_args(cfg))
        if cfg.plan.gpus:
            preset = next((o.split("=", 1)[1] for o in overrides if o.lstrip("+").startswith("model=")), "<preset>")
            plan_cluster(cfg, preset)
    except (HydraException, OmegaConfBaseException, ValueError) as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main(sys.argv[1:])
