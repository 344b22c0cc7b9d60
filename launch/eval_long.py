"""Passkey retrieval accuracy by context length and depth: what a long-context phase bought.

    # the end of each phase of a run (checkpoint.interval must have kept them)
    python launch/eval_long.py --checkpoint outputs/tiny --steps 300,400 --lengths 256,512,1024,2048,4096
    # any checkpoints, side by side: a run directory means its newest checkpoint
    python launch/eval_long.py --checkpoint runA/checkpoints/step-00000100 --checkpoint runB --out cmp

For every (length, depth) it builds `--trials` documents of exactly `length` tokens (data/passkey.py)
with the pass key at `depth` of the filler, and asks for it at the end. A trial is correct when
the model's greedy choice is right at every digit of the answer. One forward pass over the whole
document gives that: with the true digits in the input, the argmax at each answer position is
what greedy decoding would emit, and exact match fails at the first wrong digit either way. The
same seed gives the same documents for every checkpoint, so the comparison is paired.

Writes OUT.json (accuracy per length and depth, per checkpoint) and OUT.png (a heat-map per
checkpoint: rows depth, columns length; needs matplotlib). OUT defaults to eval_long in the
first run directory.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data.passkey import Filler, PasskeyDocument, make_document, min_document_length
from model import ModelArgs, Transformer
from train.checkpoint import checkpoint_step, list_checkpoints, load_checkpoint, model_args_of_checkpoint
from train.loss import model_inputs
from train.metrics import format_duration

warnings.filterwarnings("ignore", message="torch.distributed is disabled")


# ---------------------------------------------------------------- prompts and scoring


def build_documents(lengths: list[int], depths: list[float], trials: int, seed: int, digits: int,
                    filler: Filler, vocab_size: int) -> dict[int, list[list[PasskeyDocument]]]:
    """{length: [depth index][trial] -> document}; each document a pure function of its cell and
    trial, so adding a length or a depth leaves the other cells' documents as they were."""
    out = {}
    for length in lengths:
        out[length] = [[make_document(np.random.default_rng([seed, length, round(depth * 1000), trial]), length,
                                      depth, digits, filler, vocab_size) for trial in range(trials)]
                       for depth in depths]
    return out


def score(logits_of, docs: list[PasskeyDocument], rows_per_batch: int) -> tuple[np.ndarray, np.ndarray]:
    """(exact [N] bool, digits right [N] int) for documents of one length. `logits_of(batch)`
    returns logits [B, T, vocab] for a batch dict of tokens, positions and doc_ids [B, T]."""
    exact, right = [], []
    for i in range(0, len(docs), rows_per_batch):
        part = docs[i: i + rows_per_batch]
        tokens = torch.from_numpy(np.stack([d.tokens for d in part]))
        B, T = tokens.shape
        batch = {"tokens": tokens, "positions": torch.arange(T).expand(B, T), "doc_ids": torch.zeros(B, T, dtype=torch.long)}
        logits = logits_of(batch)
        for b, d in enumerate(part):
            n = len(d.key)
            want = tokens[b, d.answer_start: d.answer_start + n]
            got = logits[b, d.answer_start - 1: d.answer_start - 1 + n].argmax(-1).cpu()
            ok = got == want
            exact.append(bool(ok.all()))
            right.append(int(ok.sum()))
    return np.array(exact), np.array(right)


def evaluate(logits_of, docs: dict[int, list[list[PasskeyDocument]]], batch_tokens: int, label: str = "",
             log=print) -> dict:
    """Accuracy per length and depth; a line per length with the time left, estimated from the
    tokens done so far."""
    todo = {length: length * sum(len(cell) for cell in cells) for length, cells in docs.items()}
    total, done, start = sum(todo.values()), 0, time.perf_counter()
    accuracy, digit_accuracy = {}, {}
    for length, cells in docs.items():
        t0 = time.perf_counter()
        rows = max(1, batch_tokens // length)
        accuracy[length], digit_accuracy[length] = [], []
        for cell in cells:
            exact, right = score(logits_of, cell, rows)
            accuracy[length].append(float(exact.mean()))
            digit_accuracy[length].append(float(right.sum() / (len(cell) * len(cell[0].key))))
        done += todo[length]
        elapsed = time.perf_counter() - start
        left = elapsed / done * (total - done)
        log(f"{label}length {length:>6}: accuracy {np.mean(accuracy[length]):.2f} (digits "
            f"{np.mean(digit_accuracy[length]):.2f}) in {format_duration(time.perf_counter() - t0)}; "
            f"{format_duration(left)} left for this checkpoint")
    return {"accuracy": accuracy, "digit_accuracy": digit_accuracy}


# ---------------------------------------------------------------- checkpoints


def resolve_checkpoints(paths: list[str], steps: list[int] | None) -> list[str]:
    """Checkpoint directories for --checkpoint values: a checkpoint as it is; a run directory
    its checkpoints at --steps, or its newest without --steps."""
    out = []
    for path in paths:
        if not os.path.isdir(path):
            raise FileNotFoundError(f"--checkpoint {path}: no such directory (give a run directory or one of its "
                                    "checkpoints/step-XXXXXXXX)")
        if os.path.isfile(os.path.join(path, ".metadata")):
            if steps:
                raise ValueError(f"--steps picks checkpoints of a run directory, but {path} is a checkpoint; "
                                 "give its run directory, or leave --steps out")
            out.append(path)
            continue
        found = {checkpoint_step_of_dir(p): p for p in list_checkpoints(path)}
        if not found:
            raise FileNotFoundError(f"--checkpoint {path} holds no checkpoints (expected {path}/checkpoints/"
                                    "step-XXXXXXXX; a run saves them every checkpoint.interval steps and at the end)")
        if not steps:
            out.append(found[max(found)])
            continue
        for step in steps:
            if step not in found:
                raise FileNotFoundError(f"{path} has no checkpoint at step {step}; it has steps "
                                        f"{', '.join(map(str, sorted(found)))} (checkpoint.keep prunes older ones)")
            out.append(found[step])
    return out


def checkpoint_step_of_dir(path: str) -> int:
    return int(os.path.basename(path).split("-")[-1])


def run_config(path: str):
    """The config.yaml of the run a checkpoint belongs to, or None (weights converted from HF)."""
    from omegaconf import OmegaConf

    config = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(path))), "config.yaml")
    if os.path.isfile(os.path.join(path, "model_args.json")) or not os.path.isfile(config):
        return None
    return OmegaConf.load(config)


def trained_with(path: str) -> tuple[ModelArgs, str, int | None]:
    """(model args, label, seq_len) of a checkpoint: the run's model with the RoPE settings of the
    phase that trained its last step (a phase may change them), named by step and phase."""
    args = model_args_of_checkpoint(path).validate()
    step = checkpoint_step(path)
    cfg = run_config(path)
    if cfg is None:
        return args, f"{os.path.basename(os.path.normpath(path))} (weights)", None
    if not cfg.get("phases"):
        return args, f"step {step}", int(cfg.train.seq_len)
    from omegaconf import OmegaConf

    from train.config import PretrainConfig, data_args, model_args
    from train.phases import phase_at, resolve_phases

    full = OmegaConf.merge(OmegaConf.structured(PretrainConfig), cfg)
    phase = phase_at(resolve_phases(full, model_args(full), data_args(full)), max(step - 1, 0))
    return phase.model, f"step {step}, end of {phase.name}" if step == phase.end else f"step {step} ({phase.name})", \
        phase.seq_len


def load_model(path: str, args: ModelArgs, device: torch.device) -> Transformer:
    model = Transformer(args)
    load_checkpoint(path, model)  # sizes and checksums checked against the manifest before use
    return model.to(device).eval()


def model_logits(model: Transformer, args: ModelArgs, device: torch.device):
    """The trainer's forward (train/loss.py model_inputs: positions, doc_ids, empty images)."""
    @torch.inference_mode()
    def logits_of(batch: dict) -> torch.Tensor:
        return model(**model_inputs(batch, device, args)).float()
    return logits_of


# ---------------------------------------------------------------- output


def heatmap(results: list[dict], lengths: list[int], depths: list[float], path: str, subtitle: str) -> bool:
    """One panel per checkpoint, rows depth, columns length, each cell annotated; False when
    matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    n = len(results)
    fig, axes = plt.subplots(1, n, figsize=(1.1 * len(lengths) * n + 1.5, 0.55 * len(depths) + 1.8), squeeze=False)
    for ax, r in zip(axes[0], results):
        grid = np.array([[r["accuracy"][str(length)][i] for length in lengths] for i in range(len(depths))])
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        for i in range(len(depths)):
            for j in range(len(lengths)):
                ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=9)
        ax.set_xticks(range(len(lengths)), [str(v) for v in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("depth of the pass key")
        trained = f"\ntrained at seq_len {r['seq_len']}" if r.get("seq_len") else ""
        ax.set_title(f"{r['label']}{trained}", fontsize=10)
    fig.colorbar(image, ax=axes[0].tolist(), fraction=0.03, label="exact-match accuracy")
    fig.suptitle(f"Passkey retrieval: {subtitle}", fontsize=11, y=1.06)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return True


def parse_list(text: str, kind, name: str) -> list:
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--{name} {text!r}: give comma-separated numbers, e.g. --{name} 256,512,1024") from None
    if not values:
        raise ValueError(f"--{name} is empty")
    return values


def main_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", action="append", required=True, metavar="PATH",
                   help="a run directory or a checkpoint directory; repeat to compare")
    p.add_argument("--steps", help="comma-separated steps of each run directory's checkpoints (default: the newest)")
    p.add_argument("--lengths", help="comma-separated document lengths in tokens (default: 256, 512, ... up to "
                                     "model.max_seq_len, at most 4096)")
    p.add_argument("--depths", default="0.1,0.3,0.5,0.7,0.9", help="where the pass key sits in the filler, 0 to 1")
    p.add_argument("--trials", type=int, default=20, help="documents per (length, depth)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--digits", type=int, help="digits of the pass key (default: the run's data.passkey_digits, else 5)")
    p.add_argument("--filler", choices=("repeat", "text"), help="default: the run's data.passkey_filler, else repeat")
    p.add_argument("--filler-path", help="the text of --filler text (default: Python's pydoc topics)")
    p.add_argument("--batch-tokens", type=int, default=16384, help="tokens per forward pass (rows = this / length)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--out", help="output path without extension (default: RUN_DIR/eval_long)")
    return p


def main(argv: list[str] | None = None) -> None:
    ns = main_parser().parse_args(argv)
    try:
        run(ns)
    except (FileNotFoundError, ValueError) as e:  # CheckpointError is a ValueError
        raise SystemExit(f"error: {e}") from None


def run(ns) -> dict:
    steps = parse_list(ns.steps, int, "steps") if ns.steps else None
    depths = parse_list(ns.depths, float, "depths")
    if not all(0 <= d <= 1 for d in depths):
        raise ValueError(f"--depths {ns.depths}: every depth must be in [0, 1] (0: the start of the filler, 1: its end)")
    if ns.trials < 1 or ns.batch_tokens < 1:
        raise ValueError(f"--trials {ns.trials} and --batch-tokens {ns.batch_tokens} must be >= 1")
    paths = resolve_checkpoints(ns.checkpoint, steps)
    first = run_config(paths[0])
    data = first.get("data", {}) if first is not None else {}
    digits = ns.digits or int(data.get("passkey_digits", 5))
    filler_kind = ns.filler or str(data.get("passkey_filler", "repeat"))
    device = torch.device(ns.device)

    loaded = [trained_with(path) for path in paths]  # configs first: a bad length fails before any weights load
    max_len = min(a.max_seq_len for a, _, _ in loaded)
    if ns.lengths:
        lengths = parse_list(ns.lengths, int, "lengths")
    else:
        lengths = [n for n in (256 * 2 ** i for i in range(5)) if n <= max_len] or [max_len]
    for length in lengths:
        if length > max_len:
            which = next(path for path, (a, _, _) in zip(paths, loaded) if a.max_seq_len == max_len)
            raise ValueError(f"--lengths {length} exceeds model.max_seq_len={max_len} of {which}; drop it")
        if length < min_document_length(digits):
            raise ValueError(f"--lengths {length} is shorter than a passkey document of {digits} digits "
                             f"({min_document_length(digits)} tokens); use longer lengths or fewer --digits")
    filler = Filler(filler_kind, ns.filler_path, max(lengths))
    docs = build_documents(lengths, depths, ns.trials, ns.seed, digits, filler, loaded[0][0].vocab_size)

    results = []
    for path, (args, label, seq_len) in zip(paths, loaded):
        model = load_model(path, args, device)
        print(f"{path}: {label}", flush=True)
        scores = evaluate(model_logits(model, args, device), docs, ns.batch_tokens, label=f"  {label}: ",
                          log=lambda line: print(line, flush=True))
        results.append({"path": os.path.abspath(path), "label": label, "seq_len": seq_len,
                        "accuracy": {str(k): v for k, v in scores["accuracy"].items()},
                        "digit_accuracy": {str(k): v for k, v in scores["digit_accuracy"].items()},
                        "mean_by_length": {str(k): float(np.mean(v)) for k, v in scores["accuracy"].items()}})
        del model

    out = ns.out or os.path.join(first_run_dir(paths[0]), "eval_long")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    report = {"lengths": lengths, "depths": depths, "trials": ns.trials, "seed": ns.seed, "digits": digits,
              "filler": filler_kind, "metric": "exact match of every digit, greedy", "checkpoints": results}
    with open(out + ".json", "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {out}.json")
    # Guessing a number of `digits` digits (the first never 0) is right once in 9 * 10^(digits-1).
    subtitle = (f"{ns.trials} trials per cell, {digits}-digit key (chance {1 / (9 * 10 ** (digits - 1)):.2g}), "
                f"{filler_kind} filler")
    if heatmap(results, lengths, depths, out + ".png", subtitle):
        print(f"wrote {out}.png")
    else:
        print("no heat-map: matplotlib is not installed (pip install matplotlib); the JSON holds every number")
    return report


def first_run_dir(path: str) -> str:
    """The run directory of a checkpoint (two levels up), or the checkpoint's own for weights."""
    up = os.path.dirname(os.path.dirname(os.path.abspath(path)))
    return up if os.path.isfile(os.path.join(up, "config.yaml")) else os.path.abspath(path)


if __name__ == "__main__":
    main()
