"""Coordinate check for MetaP (docs/metap.md): does every activation keep its size as the model
gets wider, under the standard parametrisation (SP) and under MetaP (train/metap.py)?

    python launch/coord_check.py                                  # widths 64-512, 10 steps, SP and MetaP
    python launch/coord_check.py --widths 64 128 --steps 4 --out /tmp/cc

For each width (the tiny model's architecture at model.dim = width, shapes derived as in
configs/experiment/metap_width.yaml; MetaP's base is the tiny model) and each parametrisation,
it trains a few AdamW steps at a constant learning rate on structured text (uniform random
tokens make MetaP's activations decay spuriously) and, before each step and after the last,
runs a fixed probe batch through the model with forward hooks. It records the RMS of each
activation type (the mean over the layers of that type) and the RMS of its change since step 0
on that same batch (the update's effect, prefixed "d_"). Per type, across widths, at the last
step: the log-log slope (size ~ width^slope) and the max/min ratio. MetaP passes when every
type has |slope| <= 0.3 and max/min <= 3; under SP the residual stream grows with width.

No gradient clipping and no schedule: plain AdamW, so that what moves is what the
parametrisation moves. Writes coord_check.json and coord_check.png under --out and prints the
table.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TYPES = ("embedding", "attention", "ffn", "moe", "block", "logits")
MAX_SLOPE, MAX_RATIO = 0.3, 3.0  # the pass mark: within 3x across the widths


def compose(overrides: list[str]):
    """The config launch/pretrain.py would get for these overrides (outside a Hydra job)."""
    import hydra
    from hydra.core.global_hydra import GlobalHydra

    from train.config import register_configs

    register_configs()
    GlobalHydra.instance().clear()
    with hydra.initialize_config_dir(config_dir=os.path.join(ROOT, "configs"), version_base="1.3"):
        return hydra.compose("pretrain", overrides=["run.name=coord_check", *overrides])


def width_overrides(width: int, metap: bool, lr: float, extra: list[str] = ()) -> list[str]:
    return ["+model=tiny", "+experiment=metap_width", f"model.dim={width}", f"optim.metap={str(metap).lower()}",
            f"optim.lr={lr}", "run.dir=unused", *extra]


def at_width(cfg, width: int, metap: bool):
    """A copy of a composed metap_width config at another width: the experiment derives the other
    shapes from model.dim by interpolation, so one composition serves every point."""
    cfg = copy.deepcopy(cfg)  # keeps the schema's types
    cfg.model.dim, cfg.optim.metap = width, metap
    return cfg


def rms(x) -> float:
    return x.detach().float().pow(2).mean().sqrt().item()


class Recorder:
    """Forward hooks on the text model: each hooked module's output per activation type, for the
    probe forward only (training forwards pass by unrecorded)."""

    def __init__(self, model):
        self.active, self.out = False, {}
        self.handles = [model.tok_embeddings.register_forward_hook(self.hook("embedding"))]
        for i, block in model.layers.items():
            # What a branch adds to the residual stream: its output times the residual multiplier.
            scale = block.residual_multiplier
            self.handles.append(block.attention.register_forward_hook(self.hook(f"attention.{i}", scale)))
            kind = "moe" if block.is_moe else "ffn"
            self.handles.append(block.feed_forward.register_forward_hook(self.hook(f"{kind}.{i}", scale)))
            self.handles.append(block.register_forward_hook(self.hook(f"block.{i}")))
        self.handles.append(model.register_forward_hook(self.hook("logits")))

    def hook(self, name: str, scale: float = 1.0):
        def record(module, inputs, output):
            if self.active:
                out = output[0] if isinstance(output, tuple) else output
                self.out[name] = (out.detach() * scale).float()
        return record

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def by_type(values: dict[str, float]) -> dict[str, float]:
    """Mean over the layers of each type ("block.0", "block.1", ... -> "block")."""
    groups: dict[str, list[float]] = {}
    for name, v in values.items():
        groups.setdefault(name.split(".")[0], []).append(v)
    return {k: sum(v) / len(v) for k, v in groups.items()}


def measure(cfg, steps: int) -> dict[str, list[float]]:
    """Train `steps` AdamW steps of cfg's model at a constant lr; per activation type, its RMS on
    the probe batch before each step and after the last (steps + 1 values), and d_<type>: the
    RMS of its change since step 0."""
    import torch

    from train.build import build_model
    from train.config import data_args, model_args
    from train.data import build_data
    from train.loss import compute_loss, count_targets, model_inputs
    from train.optim import build_optimizer

    args, t = model_args(cfg), cfg.train
    data = build_data(data_args(cfg), args, t.seq_len, t.batch_size, 0, 1, t.seed)
    probe = next(build_data(data_args(cfg), args, t.seq_len, t.batch_size, 0, 1, t.seed + 1))
    model = build_model(args, t.seed, use_metap=cfg.optim.metap)
    opt = build_optimizer(model, cfg.optim, args)
    rec = Recorder(model)
    series: dict[str, list[float]] = {}
    first: dict[str, torch.Tensor] = {}
    for step in range(steps + 1):
        rec.active, rec.out = True, {}
        with torch.no_grad():
            model(**model_inputs(probe, torch.device("cpu"), args))
        rec.active = False
        if step == 0:
            first = dict(rec.out)
        sizes = by_type({k: rms(v) for k, v in rec.out.items()})
        deltas = by_type({k: rms(v - first[k]) for k, v in rec.out.items()})
        for k, v in [*sizes.items(), *((f"d_{k}", v) for k, v in deltas.items())]:
            series.setdefault(k, []).append(v)
        if step == steps:
            break
        batch = next(data)
        out = compute_loss(model, batch, args, global_targets=count_targets([batch]))
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        series.setdefault("loss", []).append(float(out.ce_sum / count_targets([batch])))
    rec.remove()
    return series


def slope(widths: list[float], values: list[float]) -> float:
    """Least-squares slope of log(value) on log(width): value ~ width^slope."""
    xs, ys = [math.log(w) for w in widths], [math.log(v) for v in values]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def summarise(widths: list[int], runs: dict[str, dict[int, dict[str, list[float]]]]) -> dict:
    """Per parametrisation and activation type, at the last step: slope, max/min and pass."""
    summary: dict[str, dict] = {}
    for param, by_width in runs.items():
        summary[param] = {}
        present = by_width[widths[0]]
        keys = [k for k in (*TYPES, *(f"d_{t}" for t in TYPES)) if k in present]
        for k in keys:
            last = [by_width[w][k][-1] for w in widths]
            if not all(math.isfinite(v) and v > 0 for v in last):
                summary[param][k] = {"last": last, "slope": float("nan"), "ratio": float("nan"), "ok": False}
                continue
            s, r = slope(widths, last), max(last) / min(last)
            summary[param][k] = {"last": last, "slope": s, "ratio": r,
                                 "ok": abs(s) <= MAX_SLOPE and r <= MAX_RATIO}
    return summary


def table(widths: list[int], summary: dict) -> str:
    head = f"{'param':<6} {'activation':<12}" + "".join(f"{'w=' + str(w):>10}" for w in widths)
    lines = [head + f"{'slope':>8}{'max/min':>9}  within 3x", "-" * (len(head) + 28)]
    for param, kinds in summary.items():
        for k, s in kinds.items():
            vals = "".join(f"{v:>10.3g}" for v in s["last"])
            lines.append(f"{param:<6} {k:<12}{vals}{s['slope']:>8.2f}{s['ratio']:>9.2f}  {'yes' if s['ok'] else 'NO'}")
    return "\n".join(lines)


def plot(widths: list[int], runs: dict, steps: int, path: str) -> None:
    """Rows: SP, MetaP; a column per activation type (sizes, then changes since step 0); x: width
    (log2), y: RMS (log); one line per step, darker = later. A column shares its y axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    params = list(runs)
    kinds = [k for k in (*TYPES, "d_block", "d_logits") if k in runs[params[0]][widths[0]]]
    fig, axes = plt.subplots(len(params), len(kinds), figsize=(2.6 * len(kinds), 2.6 * len(params)),
                             sharey="col", squeeze=False)
    cmap = plt.get_cmap("viridis")
    for row, param in enumerate(params):
        for col, k in enumerate(kinds):
            ax = axes[row][col]
            for step in range(steps + 1):
                ys = [runs[param][w][k][step] for w in widths]
                if k.startswith("d_") and step == 0:
                    continue  # zero by definition
                ax.plot(widths, ys, marker=".", color=cmap(step / max(steps, 1)), lw=1)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.yaxis.set_minor_formatter(NullFormatter())
            ax.set_title(f"{'SP' if param == 'sp' else 'MetaP'}: {k.replace('d_', 'change of ')}", fontsize=9)
            ax.tick_params(labelsize=7)
            if row == len(params) - 1:
                ax.set_xlabel("width (model.dim)", fontsize=8)
            if col == 0:
                ax.set_ylabel("RMS", fontsize=8)
    for col in range(len(kinds)):  # at least 1.5 decades per column: a flat line must look flat
        lo, hi = axes[0][col].get_ylim()
        if hi / lo < 30:
            mid = math.sqrt(lo * hi)
            axes[0][col].set_ylim(mid / math.sqrt(30), mid * math.sqrt(30))
    fig.suptitle(f"coordinate check: {steps} AdamW steps, lines = steps 0..{steps} (dark to light)", fontsize=10)
    fig.subplots_adjust(left=0.04, right=0.99, bottom=0.12, top=0.86, wspace=0.3, hspace=0.35)  # tight_layout: 2x slower
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--widths", type=int, nargs="+", default=[64, 128, 256, 512], help="model.dim values (multiples of 64)")
    p.add_argument("--steps", type=int, default=10, help="AdamW steps (default 10)")
    p.add_argument("--lr", type=float, default=3e-3, help="base learning rate, constant (default 3e-3)")
    p.add_argument("--params", nargs="+", default=["sp", "metap"], choices=["sp", "metap"])
    p.add_argument("--out", default="outputs/coord_check", help="directory for coord_check.json and .png")
    p.add_argument("--png", default=None, help="where the plot goes (default: OUT/coord_check.png)")
    p.add_argument("--no-plot", action="store_true", help="table and JSON only (no matplotlib)")
    p.add_argument("--from-json", default=None, help="table and plot of an earlier run's coord_check.json, no training")
    p.add_argument("overrides", nargs="*", help="more Hydra overrides, e.g. train.batch_size=4")
    a = p.parse_args(argv)
    if a.from_json:
        with open(a.from_json) as f:
            old = json.load(f)
        widths = old["widths"]
        runs = {param: {w: old["runs"][param][str(w)] for w in widths} for param in old["runs"]}
        print(table(widths, summarise(widths, runs)))
        plot(widths, runs, old["steps"], a.png or os.path.join(os.path.dirname(a.from_json), "coord_check.png"))
        return old
    widths = sorted(a.widths)
    if len(widths) < 2:
        p.error("--widths needs at least two widths for a slope")
    os.makedirs(a.out, exist_ok=True)

    jobs = [(param, w) for param in a.params for w in widths]
    cost = {job: job[1] for job in jobs}  # a rough cost model for the ETA: time ~ width
    runs: dict[str, dict[int, dict]] = {param: {} for param in a.params}
    start, done = time.perf_counter(), 0.0
    base = compose(width_overrides(widths[0], False, a.lr, a.overrides))
    for i, (param, w) in enumerate(jobs):
        t0 = time.perf_counter()
        runs[param][w] = measure(at_width(base, w, param == "metap"), a.steps)
        done += cost[(param, w)]
        elapsed = time.perf_counter() - start
        eta = elapsed / done * (sum(cost.values()) - done)
        print(f"[{i + 1}/{len(jobs)}] {param} width {w}: {time.perf_counter() - t0:.1f}s, "
              f"loss {runs[param][w]['loss'][0]:.3f} -> {runs[param][w]['loss'][-1]:.3f}; "
              f"elapsed {elapsed:.0f}s, eta {eta:.0f}s", flush=True)
    summary = summarise(widths, runs)
    print(table(widths, summary))
    result = {"widths": widths, "steps": a.steps, "lr": a.lr, "overrides": a.overrides, "runs": runs,
              "summary": summary, "seconds": time.perf_counter() - start}
    with open(os.path.join(a.out, "coord_check.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {os.path.join(a.out, 'coord_check.json')}")
    if not a.no_plot:
        png = a.png or os.path.join(a.out, "coord_check.png")
        plot(widths, runs, a.steps, png)
        print(f"wrote {png}")
    return result


if __name__ == "__main__":
    main()
