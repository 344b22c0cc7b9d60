"""Llama 4 config.json <-> herd's ModelArgs, both directions (model/hf.py converts the weights).

Every value herd can hold is written as something transformers loads and reads back to the same
ModelArgs; values transformers cannot represent are refused with a message that says why.
"""
from __future__ import annotations

import torch

from .args import ModelArgs, VisionArgs

# transformers computes `(layer + 1) % no_rope_layer_interval` and a chunked mask from
# `attention_chunk_size` whatever the layers are, so neither may be 0 or null. herd's
# nope_layer_interval=0 (no NoPE layer) is written as an interval no layer reaches, and
# attention_chunk_size=None (global attention everywhere) as a chunk no sequence fills, with every
# `layer_types` entry "full_attention". Reading the value back gives 0 or None again.
_UNREACHABLE = 2**31 - 1


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


def check_hf_text_layout(args: ModelArgs) -> None:
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
    check_hf_text_layout(args)
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
