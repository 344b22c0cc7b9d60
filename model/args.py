"""ModelArgs: every number that defines a Llama 4 model (text decoder + VisionArgs).

configs/model/*.yaml map one-to-one onto these fields. `validate()` runs before anything is
built, so a bad value stops the run with a message that names it.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class VisionArgs:
    """Sizes of the vision encoder. Defaults are Llama 4 Scout's and Maverick's (identical);
    `enabled` decides whether a model has one at all."""

    enabled: bool = False
    image_size: int = 336  # square tile side in pixels
    patch_size: int = 14
    n_channels: int = 3
    dim: int = 1408
    n_layers: int = 34
    n_heads: int = 16
    mlp_hidden: int = 5632
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    pixel_shuffle_ratio: float = 0.5  # 0.5: every 2x2 block of patches becomes one token
    projector_input_dim: int = 4096  # adapter hidden width (HF: projector_input_dim)
    projector_output_dim: int = 4096  # adapter output width (HF: projector_output_dim)
    vision_output_dim: int = 4096  # projector input width; must equal projector_output_dim
    init_std: float = 0.02
    freeze: bool = False  # no gradients for the encoder and adapter; the projector still trains

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def shuffle_factor(self) -> int:
        """Patches merged per side by pixel shuffle (2 for ratio 0.5)."""
        return round(1 / self.pixel_shuffle_ratio)

    @property
    def tokens_per_tile(self) -> int:
        return (self.patches_per_side // self.shuffle_factor) ** 2

    def validate(self) -> "VisionArgs":
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(f"vision config: {msg}")

        for name in ("image_size", "patch_size", "n_channels", "dim", "n_layers", "n_heads", "mlp_hidden",
                     "projector_input_dim", "projector_output_dim", "vision_output_dim"):
            need(getattr(self, name) > 0, f"{name}={getattr(self, name)} must be positive")
        need(
            self.image_size % self.patch_size == 0,
            f"image_size={self.image_size} is not a multiple of patch_size={self.patch_size}",
        )
        need(self.dim % self.n_heads == 0, f"dim={self.dim} is not divisible by n_heads={self.n_heads}")
        need(
            (self.dim // self.n_heads) % 4 == 0,
            f"head dim {self.dim // self.n_heads} (dim={self.dim} / n_heads={self.n_heads}) must be a multiple "
            "of 4: 2D RoPE gives half of each head to the x coordinate and half to y, in rotated pairs",
        )
        ratio = self.pixel_shuffle_ratio
        need(
            0 < ratio <= 1 and abs(1 / ratio - self.shuffle_factor) < 1e-9,
            f"pixel_shuffle_ratio={ratio} must be 1/k for a whole number k (0.5 merges 2x2 patches)",
        )
        need(
            self.patches_per_side % self.shuffle_factor == 0,
            f"pixel_shuffle_ratio={ratio} needs patches per side ({self.patches_per_side} = image_size "
            f"{self.image_size} / patch_size {self.patch_size}) to be a multiple of {self.shuffle_factor}",
        )
        need(
            self.vision_output_dim == self.projector_output_dim,
            f"vision_output_dim={self.vision_output_dim} must equal projector_output_dim="
            f"{self.projector_output_dim}: the projector reads the adapter's output",
        )
        need(self.norm_eps > 0, f"norm_eps={self.norm_eps} must be positive")
        need(self.rope_theta > 0, f"rope_theta={self.rope_theta} must be positive")
        return self


@dataclass
class MetaPBase:
    """The shapes MetaP's multipliers are relative to (train/metap.py): a proxy's, on which the
    learning rate was tuned. None: the model's own value (multiplier 1)."""

    dim: int | None = None
    n_layers: int | None = None
    n_heads: int | None = None  # attention width is n_heads x head_dim; head_dim is the model's
    ffn_hidden: int | None = None
    expert_hidden: int | None = None


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
    router_aux_loss_coef: float = 0.0  # switch-style load-balancing loss; applied with load_balance=aux_loss
    router_z_loss_coef: float = 0.0  # mean(logsumexp(router logits)^2); applied in every load_balance mode
    # aux_loss: the switch loss above | aux_free: DeepSeek-V3's per-expert routing bias, moved by
    # rate * sign(mean load - expert load) after each optimizer step | none
    load_balance: str = "aux_loss"
    aux_free_bias_update_rate: float = 1e-3

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
    # MetaP (train/metap.py, optim.metap=true): the base shapes, and the two forward multipliers
    # it derives from them: residual branches x residual_multiplier (depth), logits x
    # logit_multiplier (width). 1.0 is the standard parametrisation; export folds them into the weights.
    metap_base: MetaPBase = field(default_factory=MetaPBase)
    residual_multiplier: float = 1.0
    logit_multiplier: float = 1.0

    # Vision (early fusion): the encoder's outputs replace the <|patch|> token embeddings
    vision: VisionArgs = field(default_factory=VisionArgs)  # vision.enabled=false: a text-only model
    # The tokenizer's <|patch|> id: Llama 4's is 200092. The trainer checks it against the data's
    # tokenizer at start-up (data/specials.py says where special tokens sit in a vocabulary).
    patch_token_id: int = 200092

    def __post_init__(self) -> None:
        # ModelArgs(**OmegaConf.to_container(cfg)) and ModelArgs(**json) hand the nested config in as a dict.
        if isinstance(self.vision, dict):
            self.vision = VisionArgs(**self.vision)
        if isinstance(self.metap_base, dict):
            self.metap_base = MetaPBase(**self.metap_base)

    @property
    def aux_loss_weight(self) -> float:
        """The switch loss's weight in the training loss: zero unless load_balance=aux_loss."""
        return self.router_aux_loss_coef if self.load_balance == "aux_loss" else 0.0

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
        for name in ("residual_multiplier", "logit_multiplier"):
            need(getattr(self, name) > 0, f"{name}={getattr(self, name)} must be positive")
        for name, value in vars(self.metap_base).items():
            need(value is None or value > 0, f"metap_base.{name}={value} must be positive or null")
        need(self.router_aux_loss_coef >= 0 and self.router_z_loss_coef >= 0, "router loss coefficients must be >= 0")
        need(self.load_balance in ("aux_loss", "aux_free", "none"),
             f"load_balance={self.load_balance!r} is not one of aux_loss, aux_free, none")
        need(self.aux_free_bias_update_rate >= 0,
             f"aux_free_bias_update_rate={self.aux_free_bias_update_rate} must be >= 0")
        if self.vision.enabled:
            self.vision.validate()
            need(
                0 <= self.patch_token_id < self.vocab_size,
                f"patch_token_id={self.patch_token_id} is outside the vocabulary (vocab_size={self.vocab_size}); "
                "set patch_token_id to the tokenizer's <|patch|> id",
            )
        return self
