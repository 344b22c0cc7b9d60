"""Conversion between herd's Transformer and Hugging Face Llama 4 (config.json + safetensors).

`from_hf` reads a `Llama4ForCausalLM` folder or a `Llama4ForConditionalGeneration` folder (the
released Scout/Maverick checkpoints: text under `language_model.`, the vision encoder under
`vision_model.` and `multi_modal_projector.`). The vision weights are loaded when the model has a
vision encoder (`vision.enabled`, read from the config's `vision_config`) and skipped otherwise.
`to_hf` writes what `Llama4ForCausalLM.from_pretrained` loads for a text-only model and what
`Llama4ForConditionalGeneration.from_pretrained` loads for a model with vision. Weights keep
their dtype and are loaded onto the meta device first, so a checkpoint is never held twice in
memory. Every `dtype` in the written config.json (top level, text_config, vision_config) names
the dtype of the written weights.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import torch

from .args import ModelArgs
from .hf_config import (  # noqa: F401 - re-exported: model.hf is the import/export module
    args_from_hf_config,
    check_hf_text_layout,
    hf_config_from_args,
    hf_layer_types,
    hf_text_config_from_args,
    hf_vision_config_from_args,
    vision_args_from_hf_config,
)
from .transformer import Transformer
from .vision import HF_PREFIXES as _VISION_HF_PREFIXES
from .vision import vision_state_dict_from_hf, vision_state_dict_to_hf

_ATTN = {"q_proj": "wq", "k_proj": "wk", "v_proj": "wv", "o_proj": "wo"}
_MLP = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
_SHARD_BYTES = 5 * 2**30


# ---------------------------------------------------------------- state dicts


# herd name <-> Hugging Face name of every tensor that maps one to one ({i}: the layer). The
# routed experts' w1 and w3 are the two halves of HF's gate_up_proj and are handled apart.
_NAMES = [
    ("tok_embeddings.weight", "model.embed_tokens.weight"),
    ("norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
    ("layers.{i}.attention_norm.weight", "model.layers.{i}.input_layernorm.weight"),
    ("layers.{i}.ffn_norm.weight", "model.layers.{i}.post_attention_layernorm.weight"),
    ("layers.{i}.feed_forward.router.weight", "model.layers.{i}.feed_forward.router.weight"),
    ("layers.{i}.feed_forward.experts.w2", "model.layers.{i}.feed_forward.experts.down_proj"),
    *((f"layers.{{i}}.attention.{ours}.weight", f"model.layers.{{i}}.self_attn.{theirs}.weight")
      for theirs, ours in _ATTN.items()),
    *((f"layers.{{i}}.feed_forward.{part}{ours}.weight", f"model.layers.{{i}}.feed_forward.{part}{theirs}.weight")
      for theirs, ours in _MLP.items() for part in ("", "shared_expert.")),
]


def _pattern(template: str) -> re.Pattern:
    return re.compile(re.escape(template).replace(re.escape("{i}"), r"(?P<i>\d+)") + "$")


_TO_HF = [(_pattern(ours), theirs) for ours, theirs in _NAMES]
_FROM_HF = [(_pattern(theirs), ours) for ours, theirs in _NAMES]
_GATE_UP = _pattern("model.layers.{i}.feed_forward.experts.gate_up_proj")
_EXPERT_W13 = re.compile(r"layers\.(?P<i>\d+)\.feed_forward\.experts\.(?P<w>w1|w3)$")


def _rename(name: str, table) -> str | None:
    for pattern, target in table:
        if m := pattern.match(name):
            return target.format(i=m.groupdict().get("i"))
    return None


def state_dict_from_hf(hf: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """HF Llama 4 names -> herd names. Vision and projector weights are converted when the model
    has a vision encoder (`args.vision.enabled`) and left out otherwise."""
    out: dict[str, torch.Tensor] = {}
    if args.vision.enabled:
        out.update({f"vision.{k}": v for k, v in vision_state_dict_from_hf(hf).items()})
    unknown = []
    for name, t in hf.items():
        if name.startswith(_VISION_HF_PREFIXES):
            continue
        name = name.removeprefix("language_model.")
        if m := _GATE_UP.match(name):
            w1, w3 = t.chunk(2, dim=-1)
            out[f"layers.{m['i']}.feed_forward.experts.w1"] = w1
            out[f"layers.{m['i']}.feed_forward.experts.w3"] = w3
        elif ours := _rename(name, _FROM_HF):
            out[ours] = t
        else:
            unknown.append(name)
    if unknown:
        raise ValueError(f"Hugging Face checkpoint has names herd does not know: {unknown[:5]} ({len(unknown)} in all)")
    if args.tie_embeddings:
        out.pop("output.weight", None)
    return out


_RESIDUAL_OUTPUTS = re.compile(r"layers\.\d+\.(attention\.wo\.weight|feed_forward\.(w2\.weight|experts\.w2|"
                               r"shared_expert\.w2\.weight))$")


def fold_multipliers(sd: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """MetaP's forward multipliers folded into the weights they follow: each residual branch ends
    in a linear map (attention wo, the dense or expert and shared-expert w2), the logits in the
    output head, so the folded weights compute the same function with multipliers 1."""
    r, c = args.residual_multiplier, args.logit_multiplier
    if r == 1.0 and c == 1.0:
        return sd
    if c != 1.0 and args.tie_embeddings:
        raise ValueError(f"logit_multiplier={c} cannot be folded into an output head tied to the embeddings")
    out = dict(sd)
    for name, t in sd.items():
        if r != 1.0 and _RESIDUAL_OUTPUTS.search(name):
            out[name] = t * r
        elif c != 1.0 and name == "output.weight":
            out[name] = t * c
    return out


def state_dict_to_hf(sd: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """herd names -> HF Llama4ForCausalLM names, or Llama4ForConditionalGeneration names (text
    under `language_model.`) when the model has a vision encoder. MetaP's multipliers are folded
    into the weights (`fold_multipliers`): Hugging Face's model has none."""
    check_hf_text_layout(args)
    sd = fold_multipliers(sd, args)
    out: dict[str, torch.Tensor] = {}
    gate_up: dict[str, dict[str, torch.Tensor]] = {}
    vision = {k.removeprefix("vision."): v for k, v in sd.items() if k.startswith("vision.")}
    for name, t in sd.items():
        if name.startswith("vision.") or (name == "output.weight" and args.tie_embeddings):
            continue
        if name.endswith("expert_bias"):
            raise ValueError(
                f"{name}: model.load_balance=aux_free adds a bias to the router logits for choosing experts "
                "only; Hugging Face's Llama 4 has no such bias, so the exported model would route differently")
        if m := _EXPERT_W13.match(name):
            gate_up.setdefault(m["i"], {})[m["w"]] = t
        elif theirs := _rename(name, _TO_HF):
            out[theirs] = t
        else:
            raise ValueError(f"herd parameter {name!r} has no Hugging Face name")
    for i, w in gate_up.items():
        out[f"model.layers.{i}.feed_forward.experts.gate_up_proj"] = torch.cat((w["w1"], w["w3"]), dim=-1)
    if args.vision.enabled != bool(vision):
        raise ValueError(
            f"vision.enabled={args.vision.enabled} but the state dict has {len(vision)} vision.* parameters"
        )
    if vision:
        out = {f"language_model.{k}": v for k, v in out.items()}
        out.update(vision_state_dict_to_hf(vision))
    return out


# ---------------------------------------------------------------- folders


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a folder: the files model.safetensors.index.json lists, or every *.safetensors
    when there is no index. A folder that mixes two exports (an index that does not list a
    *.safetensors file beside it or does not name the tensors its files hold, or one tensor in two
    files) is an error, never a silent choice between old and new weights."""
    from safetensors.torch import load_file

    index = path / "model.safetensors.index.json"
    present = sorted(p.name for p in path.glob("*.safetensors"))
    weight_map = json.loads(index.read_text())["weight_map"] if index.exists() else None
    files = sorted(set(weight_map.values())) if weight_map is not None else present
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {path}")
    stale = f"{path} mixes two exports; export again into an empty folder, or remove the files that do not belong"
    if weight_map is not None and (unlisted := sorted(set(present) - set(files))):
        raise ValueError(f"{index.name} does not list {', '.join(unlisted)}: {stale}")
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        if not (path / f).exists():
            raise FileNotFoundError(f"{path / f} is listed in the index but missing")
        part = load_file(path / f)
        if twice := sorted(set(part) & set(sd))[:3]:
            raise ValueError(f"{f} holds {', '.join(twice)}, which another *.safetensors file holds too: {stale}")
        sd.update(part)
    if weight_map is not None and set(sd) != set(weight_map):
        odd = sorted(set(sd) ^ set(weight_map))[:3]
        raise ValueError(f"{index.name} and the files it lists disagree on {', '.join(odd)}: {stale}")
    return sd


def from_hf(path_or_state_dict, args: ModelArgs | None = None, dtype: torch.dtype | None = None) -> Transformer:
    """Build a herd Transformer from a Hugging Face Llama 4 folder, or from an HF-named state
    dict plus `args`. Weights keep the checkpoint's dtype unless `dtype` is given."""
    if isinstance(path_or_state_dict, (str, os.PathLike)):
        path = Path(path_or_state_dict)
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{path} has no config.json; expected a Hugging Face Llama 4 folder")
        cfg = json.loads((path / "config.json").read_text())
        args = args or args_from_hf_config(cfg)
        hf = _read_safetensors(path)
    else:
        if args is None:
            raise ValueError("from_hf(state_dict) needs args=ModelArgs(...)")
        hf = path_or_state_dict
    sd = state_dict_from_hf(hf, args)
    if dtype is not None:
        sd = {k: v.to(dtype) for k, v in sd.items()}
    with torch.device("meta"):
        model = Transformer(args)
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    if args.tie_embeddings:  # tied below, to the embedding just loaded
        missing = [k for k in missing if k != "output.weight"]
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match the config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if args.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    return model


def _weights_dtype(sd: dict[str, torch.Tensor]) -> torch.dtype:
    """The dtype of the floating-point weights: the one most elements have, should they differ."""
    counts = Counter()
    for t in sd.values():
        if t.is_floating_point():
            counts[t.dtype] += t.numel()
    return counts.most_common(1)[0][0]


def to_hf(model: Transformer | dict, out_dir, args: ModelArgs | None = None, dtype: torch.dtype | None = None) -> Path:
    """Write `model` (or a herd state dict with `args`) as a Hugging Face folder: Llama4ForCausalLM
    for a text-only model, Llama4ForConditionalGeneration for one with a vision encoder."""
    from safetensors.torch import save_file

    if isinstance(model, Transformer):
        args, sd = model.args, model.state_dict()
    elif args is None:
        raise ValueError("to_hf(state_dict, dir) needs args=ModelArgs(...)")
    else:
        sd = model
    hf = state_dict_to_hf(sd, args)
    hf = {k: (v.to(dtype) if dtype else v).detach().cpu().contiguous() for k, v in hf.items()}
    out = Path(out_dir)
    cfg = hf_config_from_args(args, _weights_dtype(hf))
    with _replacing(Path(os.path.abspath(out))) as tmp:
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        shards: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        for k, v in hf.items():
            nbytes = v.numel() * v.element_size()
            if size and size + nbytes > _SHARD_BYTES:
                shards.append({})
                size = 0
            shards[-1][k] = v
            size += nbytes
        if len(shards) == 1:
            save_file(shards[0], tmp / "model.safetensors", metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards):
                fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, tmp / fname, metadata={"format": "pt"})
                weight_map.update({k: fname for k in shard})
            total = sum(v.numel() * v.element_size() for v in hf.values())
            (tmp / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
            )
    return out


def _written_by_to_hf(name: str) -> bool:
    return name in ("config.json", "model.safetensors.index.json") or name.endswith(".safetensors")


@contextmanager
def _replacing(out: Path):
    """A new folder, written beside `out`, that takes its place only once complete: `out` holds the
    old export or the new one, never a mix of both (an old index beside new weights). An existing
    `out` must be empty or a Hugging Face folder (config.json); what to_hf does not write there
    (tokenizer files, say) is copied into the new folder."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} is a file; to_hf writes a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / "config.json").is_file():
        raise FileExistsError(f"{out} is not empty and holds no config.json, so it is no Hugging Face export that "
                              "to_hf may replace; choose a new or empty folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.{uuid.uuid4().hex[:8]}.tmp"
    old = tmp.with_suffix(".old")
    tmp.mkdir()
    try:
        yield tmp
        for f in sorted(out.iterdir()) if out.is_dir() else []:
            if not _written_by_to_hf(f.name):
                (shutil.copytree if f.is_dir() else shutil.copy2)(f, tmp / f.name)
        if out.is_dir():
            os.replace(out, old)  # a crash until the next line leaves old and new beside, complete, and no `out`
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
