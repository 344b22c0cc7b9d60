"""Learning-rate sweep report (docs/metap.md): the final loss of every run of a sweep, the best
learning rate per swept shape and parametrisation, and loss against learning rate, SP and MetaP
side by side.

    python launch/sweep_report.py sweeps/metap_width
    python launch/sweep_report.py sweeps/metap_depth --last-k 10 --png depth.png

A run is a directory under the sweep with a config.yaml (written by herd at the start of every
run) and a metrics.jsonl. Its loss is the mean of its last --last-k logged losses. The swept
variable is found from the configs (model.dim, model.n_layers or model.n_experts, whichever
varies; --vary names it). Runs that failed (no config, no losses) or stopped before train.steps
are counted, listed and left out; a run that diverged (a non-finite loss, or steps skipped as
non-finite) counts as the worst loss of its group. Prints the table; writes the plot (--png) and
the numbers (--json).
"""
from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import asdict, dataclass, field

VARIABLES = ("model.dim", "model.n_layers", "model.n_experts")
PARAMS = {False: "SP", True: "MetaP"}


@dataclass
class Run:
    path: str
    status: str  # ok | diverged | incomplete | failed
    why: str = ""
    lr: float = math.nan
    metap: bool = False
    shape: dict = field(default_factory=dict)  # the VARIABLES' values
    loss: float = math.nan  # inf when diverged
    steps: int = 0  # the last logged step


def _get(cfg: dict, dotted: str):
    for key in dotted.split("."):
        if not isinstance(cfg, dict) or key not in cfg:
            return None
        cfg = cfg[key]
    return cfg


def read_run(path: str, last_k: int) -> Run:
    """One run directory, whatever state it was left in."""
    import yaml

    try:
        with open(os.path.join(path, "config.yaml")) as f:
            cfg = yaml.safe_load(f)
        lr, steps = float(_get(cfg, "optim.lr")), int(_get(cfg, "train.steps"))
    except (OSError, yaml.YAMLError, TypeError, ValueError) as e:
        return Run(path, "failed", f"no readable config.yaml ({type(e).__name__})")
    run = Run(path, "ok", lr=lr, metap=bool(_get(cfg, "optim.metap")),
              shape={v: _get(cfg, v) for v in VARIABLES})
    losses, skipped = [], 0
    try:
        with open(os.path.join(path, "metrics.jsonl")) as f:
            for line in f:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by a killed run
                skipped += int("nonfinite_skipped" in row)
                if "loss" in row:
                    losses.append(float(row["loss"]))  # json gives NaN / Infinity as floats
                    run.steps = int(row.get("step", run.steps))
    except OSError:
        pass
    if skipped or any(not math.isfinite(x) for x in losses):
        run.status, run.loss = "diverged", math.inf
        run.why = f"{skipped} step(s) skipped as non-finite" if skipped else "non-finite loss"
    elif not losses:
        run.status, run.why = "failed", "no loss in metrics.jsonl"
    elif run.steps < steps:
        run.status, run.why = "incomplete", f"stopped at step {run.steps} of {steps}"
    else:
        tail = losses[-last_k:]
        run.loss = sum(tail) / len(tail)
    return run


def find_runs(sweep_dir: str) -> list[str]:
    """Run directories: those holding a config.yaml or metrics.jsonl (checkpoints not searched),
    and the sweep's direct subdirectories, where a job that failed before writing anything
    leaves an empty one."""
    found = set()
    for root, dirs, files in os.walk(sweep_dir):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in ("checkpoints", "wandb")]
        if "config.yaml" in files or "metrics.jsonl" in files:
            found.add(root)
            dirs[:] = []
    for d in os.listdir(sweep_dir):
        full = os.path.join(sweep_dir, d)
        if os.path.isdir(full) and not d.startswith(".") and not any(f.startswith(full + os.sep) for f in found):
            found.add(full)
    return sorted(found)


def swept_variable(runs: list[Run], vary: str | None) -> str:
    if vary:
        return vary
    varying = [v for v in VARIABLES if len({r.shape.get(v) for r in runs}) > 1]
    return varying[0] if varying else "model.dim"


def fitted_optimum(lrs: list[float], losses: list[float]) -> float | None:
    """The minimum of a parabola in log(lr) through the best grid point and its neighbours; None
    when the best point is at an end of the grid (the optimum may lie outside it)."""
    i = min(range(len(losses)), key=losses.__getitem__)
    if i == 0 or i == len(lrs) - 1 or not all(math.isfinite(x) for x in losses[i - 1:i + 2]):
        return None
    (x0, x1, x2), (y0, y1, y2) = [math.log(x) for x in lrs[i - 1:i + 2]], losses[i - 1:i + 2]
    den = (x0 - x1) * (x0 - x2) * (x1 - x2)
    a = (x2 * (y1 - y0) + x1 * (y0 - y2) + x0 * (y2 - y1)) / den
    b = (x2 * x2 * (y0 - y1) + x1 * x1 * (y2 - y0) + x0 * x0 * (y1 - y2)) / den
    return math.exp(-b / (2 * a)) if a > 0 else None


def group(runs: list[Run], variable: str) -> dict:
    """{(param, value): {"lrs": [...], "losses": [...], "best_lr", "best_loss", "fit_lr"}} over the
    runs that finished or diverged. Repeated points (same lr) keep their mean."""
    cells: dict[tuple, dict[float, list[float]]] = {}
    for r in runs:
        if r.status in ("ok", "diverged"):
            cells.setdefault((PARAMS[r.metap], r.shape.get(variable)), {}).setdefault(r.lr, []).append(r.loss)
    groups = {}
    for key in sorted(cells, key=lambda k: (k[0] != "SP", k[1] if k[1] is not None else -1)):
        lrs = sorted(cells[key])
        losses = [sum(cells[key][lr]) / len(cells[key][lr]) for lr in lrs]
        best = min(range(len(lrs)), key=losses.__getitem__)
        finite = math.isfinite(losses[best])
        groups[key] = {"lrs": lrs, "losses": losses, "best_lr": lrs[best] if finite else None,
                       "best_loss": losses[best] if finite else None, "fit_lr": fitted_optimum(lrs, losses)}
    return groups


def report(runs: list[Run], variable: str, groups: dict, last_k: int) -> str:
    count = {s: sum(r.status == s for r in runs) for s in ("ok", "diverged", "incomplete", "failed")}
    lines = [f"{len(runs)} runs: " + ", ".join(f"{n} {s}" for s, n in count.items()) +
             f"; loss = mean of the last {last_k} logged steps"]
    for r in runs:
        if r.status != "ok":
            lines.append(f"  {r.status:<10} {os.path.basename(r.path) or r.path}: {r.why}")
    all_lrs = sorted({lr for g in groups.values() for lr in g["lrs"]})
    head = f"{'param':<6} {variable:>15} " + "".join(f"{lr:>9.0e}" for lr in all_lrs) + f"{'best lr':>10}{'fit lr':>10}"
    lines += ["", head, "-" * len(head)]
    for (param, value), g in groups.items():
        cells = dict(zip(g["lrs"], g["losses"]))
        row = ""
        for lr in all_lrs:
            x = cells.get(lr)
            mark = "*" if lr == g["best_lr"] else " "
            row += f"{'':>9}" if x is None else f"{'diverged':>9}" if math.isinf(x) else f"{x:>8.3f}{mark}"
        best = f"{g['best_lr']:.0e}" if g["best_lr"] else "-"
        fit = f"{g['fit_lr']:.1e}" if g["fit_lr"] else "-"
        lines.append(f"{param:<6} {value!s:>15} {row}{best:>10}{fit:>10}")
    for param in PARAMS.values():
        bests = [g["best_lr"] for (p, _), g in groups.items() if p == param and g["best_lr"]]
        if bests:
            lines.append(f"{param}: best lr from {min(bests):.0e} to {max(bests):.0e} "
                         f"({max(bests) / min(bests):.0f}x) across {variable}")
    return "\n".join(lines)


def plot(groups: dict, variable: str, path: str, title: str) -> None:
    """SP and MetaP side by side, loss against lr (log x), one line per value of the swept
    variable; the best point starred; diverged points drawn as x at the top edge."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    params = [p for p in PARAMS.values() if any(k[0] == p for k in groups)]
    finite = [x for g in groups.values() for x in g["losses"] if math.isfinite(x)]
    if not finite:
        return
    low = min(finite)
    top = min(max(finite), low + 1.5) + 0.05  # a run far off the optimum would flatten the basin
    values = sorted({k[1] for k in groups}, key=lambda v: (v is None, v))
    cmap = plt.get_cmap("viridis")
    fig, axes = plt.subplots(1, len(params), figsize=(5.5 * len(params), 4.2), sharey=True, squeeze=False)
    for ax, param in zip(axes[0], params):
        for (p, value), g in groups.items():
            if p != param:
                continue
            color = cmap(values.index(value) / max(len(values) - 1, 1))
            ys = [min(x, top) for x in g["losses"]]
            ax.plot(g["lrs"], ys, marker="o", ms=4, color=color, label=f"{variable.split('.')[-1]}={value}")
            for lr, x in zip(g["lrs"], g["losses"]):
                if x > top:
                    ax.plot([lr], [top], marker="x" if math.isinf(x) else "^", color=color, ms=8)
            if g["best_lr"]:
                ax.plot([g["best_lr"]], [g["best_loss"]], marker="*", ms=14, color=color, mec="k")
        ax.set_xscale("log")
        ax.set_ylim(low - 0.05, top + 0.05)
        ax.set_xlabel("optim.lr")
        ax.set_title(param)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("loss")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep_dir", help="the sweep's directory (hydra.sweep.dir), e.g. sweeps/metap_width")
    p.add_argument("--last-k", type=int, default=5, help="average the last K logged losses (default 5)")
    p.add_argument("--vary", choices=VARIABLES, default=None, help="the swept variable (default: found)")
    p.add_argument("--png", default=None, help="plot path (default: SWEEP_DIR/sweep_report.png)")
    p.add_argument("--json", default=None, help="numbers path (default: SWEEP_DIR/sweep_report.json)")
    a = p.parse_args(argv)
    if not os.path.isdir(a.sweep_dir):
        p.error(f"{a.sweep_dir} is not a directory")
    if a.last_k < 1:
        p.error(f"--last-k={a.last_k} must be >= 1")
    runs = [read_run(path, a.last_k) for path in find_runs(a.sweep_dir)]
    if not runs:
        p.error(f"no runs under {a.sweep_dir}")
    variable = swept_variable(runs, a.vary)
    groups = group(runs, variable)
    print(report(runs, variable, groups, a.last_k))
    png = a.png or os.path.join(a.sweep_dir, "sweep_report.png")
    name = os.path.basename(os.path.normpath(a.sweep_dir))
    try:
        plot(groups, variable, png, f"{name}: final training loss (mean of the last {a.last_k} steps) vs lr")
    except ImportError:  # the table and the JSON do not need it
        print("no plot: matplotlib is not installed (pip install matplotlib)")
        png = None
    out = {"variable": variable, "last_k": a.last_k, "runs": [asdict(r) for r in runs],
           "groups": [{"param": k[0], "value": k[1], **g} for k, g in groups.items()]}
    with open(a.json or os.path.join(a.sweep_dir, "sweep_report.json"), "w") as f:
        json.dump(out, f, indent=1, default=str)
    if png:
        print(f"wrote {png}")
    return out


if __name__ == "__main__":
    main()
