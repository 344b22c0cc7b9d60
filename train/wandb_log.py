"""Weights & Biases charts for a run, on rank 0 only. metrics.jsonl stays the source of truth:
wandb gets the same rows under the same keys, plus a per-layer x per-expert load heatmap
whenever a row carries the `expert_counts` table.

Modes (`logging.wandb.mode`):
- offline (default): files under ${run.dir}/wandb/offline-run-*/; no account, API key or network.
  `wandb sync ${run.dir}/wandb/offline-run-*` uploads them later.
- online: streams to the wandb server; needs `wandb login` or WANDB_API_KEY.
- disabled: nothing is imported or written.

The wandb run id lives in ${run.dir}/wandb_id.txt, so a rerun of the same run (a resume, a
Slurm requeue) continues the same wandb run. wandb is imported lazily: herd runs without it. A
missing package is an error in online mode (the user asked for a live dashboard) and one
warning in offline mode (the files would only be a copy of metrics.jsonl).
"""
from __future__ import annotations

import importlib.util
import logging
import os
import re
import secrets
import string

import numpy as np

log = logging.getLogger("herd")

ID_FILE = "wandb_id.txt"
_LAYER_KEY = re.compile(r"moe/layer(\d+)/")  # train.balance.expert_metrics' per-layer keys
# Heatmap colours: a perceptually ordered ramp (viridis' anchors), so the image needs no matplotlib.
_RAMP = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float64)
# A layer's load is shown as tokens / mean tokens per expert: 0 (dark) .. 1 (balanced, middle) .. 2+ (bright).
_MAX_RATIO = 2.0


def expert_heatmap(counts, cell: int | None = None):
    """Tokens per expert as a PIL image: one row of cells per MoE layer (ascending), one column per
    expert, coloured by the expert's share relative to a perfectly balanced layer."""
    from PIL import Image

    c = np.asarray(counts, dtype=np.float64)
    if c.ndim != 2 or c.size == 0:
        raise ValueError(f"expert_counts must be a [layers][experts] table, got shape {c.shape}")
    mean = c.mean(axis=1, keepdims=True)
    ratio = np.divide(c, mean, out=np.zeros_like(c), where=mean > 0)
    x = np.clip(ratio / _MAX_RATIO, 0.0, 1.0) * (len(_RAMP) - 1)
    lo = np.minimum(x.astype(int), len(_RAMP) - 2)
    frac = (x - lo)[..., None]
    rgb = (_RAMP[lo] * (1 - frac) + _RAMP[lo + 1] * frac).round().astype(np.uint8)
    # Cells big enough to see at a glance, but Maverick's 128 experts stay about 512 pixels wide.
    cell = cell or max(4, min(32, 512 // c.shape[1]))
    rgb = rgb.repeat(cell, axis=0).repeat(cell, axis=1)
    return Image.fromarray(rgb)  # uint8 [H, W, 3]: RGB


def new_run_id() -> str:
    """Eight lowercase letters and digits, the shape of wandb's own run ids."""
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def read_or_create_run_id(run_dir: str) -> str:
    """The run's wandb id: read from ${run_dir}/wandb_id.txt, or made and written there
    (atomically, so a crash never leaves a half-written id)."""
    path = os.path.join(run_dir, ID_FILE)
    if os.path.exists(path):
        with open(path) as f:
            run_id = f.read().strip()
        if run_id:
            return run_id
    run_id = new_run_id()
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(run_id + "\n")
    os.replace(tmp, path)
    return run_id


def wandb_installed() -> bool:
    return importlib.util.find_spec("wandb") is not None


class WandbLogger:
    """wandb for one training run. Every rank builds one (so that a configuration error stops all
    ranks alike); only the main rank logs. Call `log(row, step)` with each metrics.jsonl row and
    `finish()` at the end, also when the run stops early."""

    def __init__(self, cfg, run_dir: str, config: dict | None, is_main: bool):
        self.run = None
        self._warned = False
        mode = cfg.mode
        if mode == "disabled":
            return
        if not wandb_installed():
            if mode == "online":
                raise ValueError("logging.wandb.mode=online needs the wandb package: pip install 'herd[wandb]' "
                                 "(or set logging.wandb.mode=offline or disabled)")
            if is_main:
                log.warning("logging.wandb.mode=offline but wandb is not installed; metrics go to metrics.jsonl only "
                            "(pip install 'herd[wandb]', or logging.wandb.mode=disabled to silence this)")
            return
        if not is_main:
            return
        if mode == "offline":
            # wandb's process-wide analytics and crash reporting follow the environment, not the
            # run's settings: without these, an offline run still contacts the wandb server at exit.
            os.environ["WANDB_MODE"] = "offline"
            os.environ.setdefault("WANDB_ERROR_REPORTING", "false")
        os.environ.setdefault("WANDB_SILENT", "true")

        import wandb

        os.makedirs(run_dir, exist_ok=True)
        run_id = read_or_create_run_id(run_dir)
        name = cfg.name or os.path.basename(os.path.abspath(run_dir))
        try:
            self.run = wandb.init(
                project=cfg.project, entity=cfg.entity, name=name, group=cfg.group, tags=list(cfg.tags) or None,
                config=config, dir=run_dir, id=run_id, resume="allow", mode=mode,
                # silent: herd's console line already reports every step; wandb's banner would repeat it per run
                settings=wandb.Settings(silent=True))
        except Exception as e:  # noqa: BLE001 - a dashboard that cannot start must not stop training
            log.warning(f"wandb could not start ({type(e).__name__}: {e}); metrics go to metrics.jsonl only")
            self.run = None
            return
        log.info(f"wandb {mode}: run {run_id} in {os.path.join(run_dir, 'wandb')}")

    @property
    def enabled(self) -> bool:
        return self.run is not None

    def log(self, row: dict, step: int) -> None:
        """One metrics.jsonl row. Scalars keep their metrics.jsonl names; `expert_counts` becomes
        the `moe/expert_load` heatmap in the same wandb step."""
        if self.run is None:
            return
        data = {k: v for k, v in row.items() if k not in ("step", "expert_counts") and _is_scalar(v)}
        if "expert_counts" in row:
            layers = sorted({int(m.group(1)) for k in row if (m := _LAYER_KEY.match(k))})
            data.update(self._heatmap(row["expert_counts"], layers))
        self._log(data, step)

    def log_expert_heatmap(self, counts: list[list[int]], step: int, layer_ids: list[int] | None = None) -> None:
        """The tokens-per-expert table ([MoE layer][expert]) as an image, on its own."""
        if self.run is not None:
            self._log(self._heatmap(counts, layer_ids or []), step)

    def finish(self) -> None:
        if self.run is None:
            return
        try:
            self.run.finish()
        except Exception as e:  # noqa: BLE001
            log.warning(f"wandb did not finish cleanly ({type(e).__name__}: {e})")
        self.run = None

    def _heatmap(self, counts, layer_ids: list[int]) -> dict:
        import wandb

        rows = len(counts)
        which = f"MoE layers {', '.join(map(str, layer_ids))}" if len(layer_ids) == rows else f"{rows} MoE layers"
        caption = (f"rows: {which} (top to bottom); columns: experts; colour: tokens / the layer's mean "
                   f"(dark 0, middle 1 = balanced, bright >= {_MAX_RATIO:g})")
        return {"moe/expert_load": wandb.Image(expert_heatmap(counts), caption=caption)}

    def _log(self, data: dict, step: int) -> None:
        try:
            # herd's step is the x-axis; commit hands the row over now instead of holding it open
            # until the next step arrives. After a resume from a checkpoint older than the last
            # logged step, wandb drops the repeated steps with a warning; metrics.jsonl keeps them.
            self.run.log(data, step=step, commit=True)
        except Exception as e:  # noqa: BLE001 - losing a chart point must not stop training
            if not self._warned:
                log.warning(f"wandb.log failed ({type(e).__name__}: {e}); further failures are not reported")
                self._warned = True


def _is_scalar(v) -> bool:
    return isinstance(v, (int, float))
