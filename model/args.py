"""ModelArgs: every number that defines a Llama 4 text decoder.

configs/model/*.yaml map one-to-one onto these fields. `validate()` runs before anything is
built, so a bad value stops the run with a message that names it.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ModelArgs:
    # Sizes
    vocab_size: int = 202048
    dim: int = 5120
    n_layers: int = 48
    n_heads: int = 40
    n_kv_heads: int = 8
    head_dim: int | None = None  # None: dim // n_heads
    norm_eps: float = 1e-5
    max_seq_len: int = 8192
    tie_embeddings: bool = False

    # Feed-forward: dense SwiGLU layers and mixture-of-experts layers
    ffn_hidden: int = 16384  # dense layers (HF: intermediate_size_mlp)
    expert_hidden: int = 8192  # each routed expert and the shared expert (HF: intermediate_size)
    n_experts: int = 16
    top_k: int = 1
    shared_expert: bool = True
    interleave_moe_layer_step: int = 1  # layer i is MoE when (i + 1) % step == 0; 0: no MoE
    router_aux_loss_coef: float = 0.0  # switch-style load-balancing loss
    router_z_loss_coef: float = 0.0  # mean(logsumexp(router logits)^2)

    # Attention: iRoPE
    rope_theta: float = 500000.0
    rope_scaling_factor: float | None = None  # llama3-style scaling; None: plain RoPE
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 1.0
    rope_original_max_seq_len: int = 8192
    nope_layer_interval: int = 4  # layer i has no RoPE (global attention) when (i + 1) % interval == 0; 0: none
    attention_chunk_size: int | None = 8192  # local causal chunks on RoPE layers; None: global everywhere
    use_qk_norm: bool = True  # weightless RMSNorm of q and k after RoPE, RoPE layers only
    attn_temperature_tuning: bool = True  # NoPE layers: q *= 1 + attn_scale * log(floor((pos + 1) / floor_scale) + 1)
    floor_scale: int = 8192
    attn_scale: float = 0.1

    # Initialisation
    init_std: float = 0.02

    @property
    def head_size(self) -> int:
        return self.head_dim if self.head_dim else self.dim // self.n_heads

    def is_moe_layer(self, layer: int) -> bool:
        step = self.interleave_moe_layer_step
        return step > 0 and self.n_experts > 0 and (layer + 1) % step == 0

    def is_nope_layer(self, layer: int) -> bool:
        return self.nope_layer_interval > 0 and (layer + 1) % self.nope_layer_interval == 0

    def validate(self) -> "ModelArgs":
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(f"model config: {msg}")

        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "max_seq_len"):
            need(getattr(self, name) > 0, f"{name}={getattr(self, name)} must be positive")
        need(
            self.n_heads % self.n_kv_heads == 0,
            f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}; "
            "grouped-query attention needs a whole number of query heads per kv head",
        )
        if self.head_dim is None:
            need(
                self.dim % self.n_heads == 0,
                f"dim={self.dim} is not divisible by n_heads={self.n_heads}; set head_dim explicitly",
            )
        need(self.head_size % 2 == 0, f"head_dim={self.head_size} must be even for RoPE")
        need(self.interleave_moe_layer_step >= 0, f"interleave_moe_layer_step={self.interleave_moe_layer_step} must be >= 0")
        if self.interleave_moe_layer_step > 0:
            need(self.n_experts > 0, f"n_experts={self.n_experts} must be positive when MoE layers are on")
            need(
                1 <= self.top_k <= self.n_experts,
                f"top_k={self.top_k} must be between 1 and n_experts={self.n_experts}",
            )
            need(self.expert_hidden > 0, f"expert_hidden={self.expert_hidden} must be positive")
        if self.interleave_moe_layer_step != 1:
            need(self.ffn_hidden > 0, f"ffn_hidden={self.ffn_hidden} must be positive (dense layers exist)")
        need(self.nope_layer_interval >= 0, f"nope_layer_interval={self.nope_layer_interval} must be >= 0")
        need(
            self.attention_chunk_size is None or self.attention_chunk_size > 0,
            f"attention_chunk_size={self.attention_chunk_size} must be positive or null",
        )
        need(self.floor_scale > 0, f"floor_scale={self.floor_scale} must be positive")
        if self.rope_scaling_factor is not None:
            need(self.rope_scaling_factor >= 1, f"rope_scaling_factor={self.rope_scaling_factor} must be >= 1")
            need(
                self.rope_high_freq_factor >= self.rope_low_freq_factor,
                f"rope_high_freq_factor={self.rope_high_freq_factor} must be >= rope_low_freq_factor={self.rope_low_freq_factor}",
            )
        need(self.norm_eps > 0, f"norm_eps={self.norm_eps} must be positive")
        need(self.router_aux_loss_coef >= 0 and self.router_z_loss_coef >= 0, "router loss coefficients must be >= 0")
        return self
