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

from .args import ModelArgs, VisionArgs
from .transformer import Transformer
from .vision import HF_PREFIXES as _VISION_HF_PREFIXES
from .vision import vision_state_dict_from_hf, vision_state_dict_to_hf

_ATTN = {"q_proj": "wq", "k_proj": "wk", "v_proj": "wv", "o_proj": "wo"}
_MLP = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
_SHARD_BYTES = 5 * 2**30
# transformers computes `(layer + 1) % no_rope_layer_interval` and a chunked mask from
# `attention_chunk_size` whatever the layers are, so neither may be 0 or null. herd's
# nope_layer_interval=0 (no NoPE layer) is written as an interval no layer reaches, and
# attention_chunk_size=None (global attention everywhere) as a chunk no sequence fills, with every
# `layer_types` entry "full_attention". Reading the value back gives 0 or None again.
_UNREACHABLE = 2**31 - 1


# ---------------------------------------------------------------- config


def _check_hf_vision_layout(v: VisionArgs) -> VisionArgs:
    """transformers sizes the adapter from other fields: its first linear reads `intermediate_size`
    (vision.mlp_hidden) features after pixel shuffle, and its second maps projector_output_dim to
    itself. herd's encoder has no such ties; a Hugging Face Llama 4 folder needs them."""
    shuffled = v.dim * v.shuffle_factor**2
    if v.mlp_hidden != shuffled or v.projector_input_dim != v.projector_output_dim:
        raise ValueError(
            f"vision mlp_hidden={v.mlp_hidden}, projector_input_dim={v.projector_input_dim}, projector_output_dim="
            f"{v.projector_output_dim}: transformers' Llama 4 vision adapter needs mlp_hidden == dim * "
            f"{v.shuffle_factor}^2 = {shuffled} and projector_input_dim == projector_output_dim"
        )
    return v


def vision_args_from_hf_config(vc: dict) -> VisionArgs:
    """VisionArgs (enabled) from the `vision_config` of a Llama 4 config.json. Missing keys take
    transformers' Llama4VisionConfig defaults, as transformers itself would."""
    unsupported = {
        "hidden_act": (vc.get("hidden_act", "gelu"), "gelu"),
        "vision_feature_layer": (vc.get("vision_feature_layer", -1), -1),
        "vision_feature_select_strategy": (vc.get("vision_feature_select_strategy", "default"), "default"),
        "multi_modal_projector_bias": (vc.get("multi_modal_projector_bias", False), False),
    }
    for key, (value, supported) in unsupported.items():
        if value != supported:
            raise ValueError(f"vision_config {key}={value!r}: herd's vision encoder supports only {supported!r}")
    sizes = {}
    for key in ("image_size", "patch_size"):
        value = vc.get(key, 448 if key == "image_size" else 14)
        if isinstance(value, (list, tuple)):
            if len(set(value)) != 1:
                raise ValueError(f"vision_config {key}={value}: herd's vision encoder needs square tiles")
            value = value[0]
        sizes[key] = int(value)
    rope = vc.get("rope_parameters") or {}
    args = VisionArgs(
        enabled=True,
        **sizes,
        n_channels=vc.get("num_channels", 3),
        dim=vc.get("hidden_size", 768),
        n_layers=vc.get("num_hidden_layers", 34),
        n_heads=vc.get("num_attention_heads", 16),
        mlp_hidden=vc.get("intermediate_size", 5632),
        norm_eps=vc.get("norm_eps", 1e-5),
        rope_theta=float(rope.get("rope_theta", vc.get("rope_theta", 10000.0))),
        pixel_shuffle_ratio=vc.get("pixel_shuffle_ratio", 0.5),
        projector_input_dim=vc.get("projector_input_dim", 4096),
        projector_output_dim=vc.get("projector_output_dim", 4096),
        vision_output_dim=vc.get("vision_output_dim", 7680),
        init_std=vc.get("initializer_range", 0.02),
    ).validate()
    return _check_hf_vision_layout(args)


def args_from_hf_config(cfg: dict) -> ModelArgs:
    """ModelArgs from a Llama 4 config.json: a text config, or a multimodal one (its `text_config`,
    and its `vision_config` as an enabled vision encoder when present)."""
    vision, patch_token_id = VisionArgs(), 200092
    if cfg.get("model_type") == "llama4" or "text_config" in cfg:
        if cfg.get("vision_config"):
            vision = vision_args_from_hf_config(cfg["vision_config"])
            patch_token_id = cfg.get("image_token_index", cfg.get("image_token_id", 200092))
        cfg = cfg["text_config"]
    if cfg.get("model_type", "llama4_text") != "llama4_text":
        raise ValueError(f"config.json has model_type={cfg.get('model_type')!r}; expected a Llama 4 model")
    rope = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or rope
    theta = rope.get("rope_theta", cfg.get("rope_theta", 500000.0))
    n_layers = cfg.get("num_hidden_layers", 48)
    step = cfg.get("interleave_moe_layer_step", 1)
    interval = cfg.get("no_rope_layer_interval", 4)
    interval = 0 if interval == _UNREACHABLE else interval
    chunk = cfg.get("attention_chunk_size", 8192)
    args = ModelArgs(
        vocab_size=cfg.get("vocab_size", 202048),
        dim=cfg.get("hidden_size", 5120),
        n_layers=n_layers,
        n_heads=cfg.get("num_attention_heads", 40),
        n_kv_heads=cfg.get("num_key_value_heads") or cfg.get("num_attention_heads", 40),
        head_dim=cfg.get("head_dim"),
        norm_eps=cfg.get("rms_norm_eps", 1e-5),
        max_seq_len=cfg.get("max_position_embeddings", 131072),
        tie_embeddings=cfg.get("tie_word_embeddings", False),
        ffn_hidden=cfg.get("intermediate_size_mlp", 16384),
        expert_hidden=cfg.get("intermediate_size", 8192),
        n_experts=cfg.get("num_local_experts", 16),
        top_k=cfg.get("num_experts_per_tok", 1),
        interleave_moe_layer_step=step,
        router_aux_loss_coef=cfg.get("router_aux_loss_coef", 0.0),
        rope_theta=theta,
        rope_scaling_factor=scaling.get("factor") if scaling.get("rope_type", "default") == "llama3" else None,
        rope_low_freq_factor=scaling.get("low_freq_factor", 1.0),
        rope_high_freq_factor=scaling.get("high_freq_factor", 1.0),
        rope_original_max_seq_len=scaling.get("original_max_position_embeddings", 8192),
        nope_layer_interval=interval,
        attention_chunk_size=None if chunk == _UNREACHABLE else chunk,
        use_qk_norm=cfg.get("use_qk_norm", True),
        attn_temperature_tuning=bool(cfg.get("attn_temperature_tuning", True)),
        floor_scale=int(cfg.get("floor_scale", 8192)),
        attn_scale=cfg.get("attn_scale", 0.1),
        init_std=cfg.get("initializer_range", 0.02),
        vision=vision,
        patch_token_id=patch_token_id,
    )
    args.validate()
    # Explicit layer lists must agree with the interleaving rules herd builds from.
    moe_layers = cfg.get("moe_layers")
    if moe_layers is not None and list(moe_layers) != [i for i in range(n_layers) if args.is_moe_layer(i)]:
        raise ValueError(
            f"config.json moe_layers={moe_layers} is not every {step}th layer; herd builds MoE layers "
            "from interleave_moe_layer_step only"
        )
    no_rope = cfg.get("no_rope_layers")
    if no_rope:
        expected = [int(not args.is_nope_layer(i)) for i in range(n_layers)]
        if list(no_rope)[:n_layers] != expected:
            raise ValueError(
                f"config.json no_rope_layers={no_rope} is not one NoPE layer every {interval}; herd builds "
                "NoPE layers from no_rope_layer_interval only"
            )
    # layer_types says which layers transformers chunks; none chunked means global attention. (A
    # config with attention_chunk_size null is global whatever layer_types transformers derived.)
    layer_types = cfg.get("layer_types")
    if layer_types and args.attention_chunk_size is not None:
        rope_types = {t for i, t in enumerate(layer_types) if not args.is_nope_layer(i)}
        if rope_types == {"full_attention"}:
            args.attention_chunk_size = None  # no layer is chunked: global attention everywhere
        if list(layer_types) != hf_layer_types(args):
            raise ValueError(
                f"config.json layer_types={layer_types} does not chunk exactly the RoPE layers; herd chunks "
                "every RoPE layer (attention_chunk_size) and no NoPE layer"
            )
    return args


def hf_layer_types(args: ModelArgs) -> list[str]:
    """transformers' attention kind of each layer: chunked on RoPE layers when there is a chunk."""
    chunked = args.attention_chunk_size is not None
    return ["chunked_attention" if chunked and not args.is_nope_layer(i) else "full_attention"
            for i in range(args.n_layers)]


def _check_hf_text_layout(args: ModelArgs) -> None:
    if not args.shared_expert and any(args.is_moe_layer(i) for i in range(args.n_layers)):
        raise ValueError(
            "shared_expert=False: every MoE layer of Hugging Face's Llama 4 has a shared expert, so transformers "
            "would fill it with random weights; export a model trained with shared_expert=true"
        )


def _dtype_name(dtype: torch.dtype | str) -> str:
    return dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")


def hf_vision_config_from_args(v: VisionArgs, dtype: torch.dtype | str = "bfloat16") -> dict:
    _check_hf_vision_layout(v)
    return {
        "model_type": "llama4_vision_model",
        "hidden_act": "gelu",
        "image_size": v.image_size,
        "patch_size": v.patch_size,
        "num_channels": v.n_channels,
        "hidden_size": v.dim,
        "num_hidden_layers": v.n_layers,
        "num_attention_heads": v.n_heads,
        "intermediate_size": v.mlp_hidden,
        "norm_eps": v.norm_eps,
        "rope_theta": v.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": v.rope_theta},
        "pixel_shuffle_ratio": v.pixel_shuffle_ratio,
        "projector_input_dim": v.projector_input_dim,
        "projector_output_dim": v.projector_output_dim,
        "vision_output_dim": v.vision_output_dim,
        "multi_modal_projector_bias": False,
        "vision_feature_layer": -1,
        "vision_feature_select_strategy": "default",
        "initializer_range": v.init_std,
        "dtype": _dtype_name(dtype),
    }


def hf_config_from_args(args: ModelArgs, dtype: torch.dtype | str = "bfloat16") -> dict:
    """A Llama4ForCausalLM config.json, or a Llama4ForConditionalGeneration one (the text config
    under `text_config`) when the model has a vision encoder. `dtype` is the weights' dtype; every
    config level names it (transformers 5 reads and writes `dtype`; `torch_dtype` is its old name)."""
    text = hf_text_config_from_args(args, dtype)
    if not args.vision.enabled:
        return text
    text.pop("architectures")
    patch = args.patch_token_id
    return {
        "architectures": ["Llama4ForConditionalGeneration"],
        "model_type": "llama4",
        "text_config": text,
        "vision_config": hf_vision_config_from_args(args.vision, dtype),
        # <|image_start|> and <|image_end|> sit 12 and 11 ids before <|patch|> in Llama 4's specials.
        "boi_token_index": patch - 12,
        "eoi_token_index": patch - 11,
        "image_token_index": patch,
        "tie_word_embeddings": args.tie_embeddings,
        "dtype": _dtype_name(dtype),
    }


def hf_text_config_from_args(args: ModelArgs, dtype: torch.dtype | str = "bfloat16") -> dict:
    _check_hf_text_layout(args)
    rope: dict = {"rope_type": "default", "rope_theta": args.rope_theta}
    if args.rope_scaling_factor is not None:
        rope.update(
            rope_type="llama3",
            factor=args.rope_scaling_factor,
            low_freq_factor=args.rope_low_freq_factor,
            high_freq_factor=args.rope_high_freq_factor,
            original_max_position_embeddings=args.rope_original_max_seq_len,
        )
    n = args.n_layers
    return {
        "architectures": ["Llama4ForCausalLM"],
        "model_type": "llama4_text",
        "vocab_size": args.vocab_size,
        "hidden_size": args.dim,
        "num_hidden_layers": n,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "head_dim": args.head_size,
        "rms_norm_eps": args.norm_eps,
        "max_position_embeddings": args.max_seq_len,
        "tie_word_embeddings": args.tie_embeddings,
        "intermediate_size": args.expert_hidden,
        "intermediate_size_mlp": args.ffn_hidden,
        "num_local_experts": args.n_experts,
        "num_experts_per_tok": args.top_k,
        "interleave_moe_layer_step": args.interleave_moe_layer_step,
        "moe_layers": [i for i in range(n) if args.is_moe_layer(i)],
        "router_aux_loss_coef": args.router_aux_loss_coef,
        "rope_theta": args.rope_theta,
        "rope_scaling": rope if args.rope_scaling_factor is not None else None,
        "rope_parameters": rope,
        "no_rope_layer_interval": args.nope_layer_interval or _UNREACHABLE,
        "no_rope_layers": [int(not args.is_nope_layer(i)) for i in range(n)],
        "attention_chunk_size": _UNREACHABLE if args.attention_chunk_size is None else args.attention_chunk_size,
        "layer_types": hf_layer_types(args),
        "use_qk_norm": args.use_qk_norm,
        "attn_temperature_tuning": args.attn_temperature_tuning,
        "floor_scale": args.floor_scale,
        "attn_scale": args.attn_scale,
        "initializer_range": args.init_std,
        "hidden_act": "silu",
        "attention_bias": False,
        # Llama 4's special ids, when the vocabulary is Llama 4's.
        "bos_token_id": 200000 if args.vocab_size == 202048 else None,
        "eos_token_id": [200001, 200007, 200008] if args.vocab_size == 202048 else None,
        "pad_token_id": 200018 if args.vocab_size == 202048 else None,
        "dtype": _dtype_name(dtype),
    }


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


def state_dict_to_hf(sd: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """herd names -> HF Llama4ForCausalLM names, or Llama4ForConditionalGeneration names (text
    under `language_model.`) when the model has a vision encoder."""
    _check_hf_text_layout(args)
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
