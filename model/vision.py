"""The Llama 4 vision encoder: pixel tiles in, one embedding per <|patch|> token out.

    tiles [N, 3, 336, 336]
      -> 14x14 patches, flattened and projected (a linear layer, no bias)   [N, 576, 1408]
      -> class embedding appended LAST, learned positions, LayerNorm        [N, 577, 1408]
      -> 34 pre-LN encoder layers (full attention with 2D RoPE, GELU MLP)
      -> LayerNorm, class token dropped                                     [N, 576, 1408]
      -> pixel shuffle 0.5: each 2x2 block of patches becomes one token     [N, 144, 5632]
      -> adapter: two GELU-activated linears                                [N, 144, 4096]
      -> projector: one linear into the text model's width                  [N, 144, text_dim]

`scatter_image_features` then writes those rows over the <|patch|> token embeddings (early
fusion). Hugging Face transformers' Llama4VisionModel + Llama4MultiModalProjector are the
reference; `vision_state_dict_to_hf` / `vision_state_dict_from_hf` convert parameter names.
"""
from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import nn

from .args import VisionArgs
from .layers import apply_rope

# ---------------------------------------------------------------- 2D rotary embedding


def vision_rope_cos_sin(args: VisionArgs, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape [n_patches + 1, 1, head_dim / 2] for `apply_rope`.

    Each head's rotated pairs are split in two: the first half turn with the patch's column
    (x + 1), the second half with its row (y + 1), over the same head_dim / 4 frequencies.
    The class token (last) is not rotated."""
    side = args.patches_per_side
    quarter = args.dim // args.n_heads // 4
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(quarter, dtype=torch.float32, device=device) / quarter))
    idx = torch.arange(side * side, device=device)
    x, y = (idx % side + 1).float(), (idx // side + 1).float()
    angles = torch.cat([x[:, None] * inv_freq, y[:, None] * inv_freq], dim=-1)
    angles = torch.cat([angles, angles.new_zeros(1, angles.shape[1])])  # class token: angle 0
    return angles.cos()[:, None, :], angles.sin()[:, None, :]


# ---------------------------------------------------------------- encoder layer


class VisionAttention(nn.Module):
    """Bidirectional multi-head attention with biases and 2D RoPE on q and k."""

    def __init__(self, args: VisionArgs):
        super().__init__()
        self.n_heads, self.head_dim = args.n_heads, args.dim // args.n_heads
        self.wq = nn.Linear(args.dim, args.dim, bias=True)
        self.wk = nn.Linear(args.dim, args.dim, bias=True)
        self.wv = nn.Linear(args.dim, args.dim, bias=True)
        self.wo = nn.Linear(args.dim, args.dim, bias=True)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        N, S, _ = x.shape
        q = apply_rope(self.wq(x).view(N, S, self.n_heads, self.head_dim), *rope)
        k = apply_rope(self.wk(x).view(N, S, self.n_heads, self.head_dim), *rope)
        v = self.wv(x).view(N, S, self.n_heads, self.head_dim)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.wo(out.transpose(1, 2).reshape(N, S, self.n_heads * self.head_dim))


class VisionFeedForward(nn.Module):
    """w2(gelu(w1 x)), both with biases."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=True)
        self.w2 = nn.Linear(hidden, dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.gelu(self.w1(x)))


class VisionBlock(nn.Module):
    """Pre-LN residual block: h + attention(norm(h)), then h + feed_forward(norm(h))."""

    def __init__(self, args: VisionArgs):
        super().__init__()
        self.attention_norm = nn.LayerNorm(args.dim, eps=args.norm_eps)
        self.attention = VisionAttention(args)
        self.ffn_norm = nn.LayerNorm(args.dim, eps=args.norm_eps)
        self.feed_forward = VisionFeedForward(args.dim, args.mlp_hidden)

    def forward(self, h: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        h = h + self.attention(self.attention_norm(h), rope)
        return h + self.feed_forward(self.ffn_norm(h))


# ---------------------------------------------------------------- pixel shuffle and adapter


def pixel_shuffle(x: torch.Tensor, factor: int) -> torch.Tensor:
    """[N, side*side, C] -> [N, (side/factor)^2, C*factor^2]: each factor x factor block of
    patches becomes one token, in row-major order. Its channels are ordered (row offset,
    column offset, channel), the layout Llama 4's weights were trained with."""
    N, P, C = x.shape
    side = math.isqrt(P)
    s = factor
    x = x.view(N, side // s, s, side // s, s, C)  # [N, block row, row offset, block col, col offset, C]
    return x.permute(0, 1, 3, 2, 4, 5).reshape(N, (side // s) ** 2, s * s * C)


class VisionAdapter(nn.Module):
    """gelu(w2(gelu(w1 x))): the two-layer MLP after pixel shuffle (no biases). The output
    activation is part of Llama 4's design, not a slip."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int):
        super().__init__()
        self.w1 = nn.Linear(in_dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, out_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.w2(F.gelu(self.w1(x))))


# ---------------------------------------------------------------- the encoder


class VisionEncoder(nn.Module):
    def __init__(self, args: VisionArgs, text_dim: int):
        super().__init__()
        self.args = args.validate()
        n_patches = args.patches_per_side**2
        self.patch_embed = nn.Linear(args.n_channels * args.patch_size**2, args.dim, bias=False)
        self.cls_embedding = nn.Parameter(torch.empty(args.dim))
        self.pos_embedding = nn.Parameter(torch.empty(n_patches + 1, args.dim))
        self.norm_pre = nn.LayerNorm(args.dim, eps=args.norm_eps)
        # A ModuleDict keyed by layer index keeps names stable when parallel/ wraps blocks.
        self.layers = nn.ModuleDict({str(i): VisionBlock(args) for i in range(args.n_layers)})
        self.norm_post = nn.LayerNorm(args.dim, eps=args.norm_eps)
        self.adapter = VisionAdapter(
            args.dim * args.shuffle_factor**2, args.projector_input_dim, args.projector_output_dim
        )
        self.projector = nn.Linear(args.vision_output_dim, text_dim, bias=False)
        self.init_weights()
        if args.freeze:
            for module in (self.patch_embed, self.norm_pre, self.layers, self.norm_post, self.adapter):
                module.requires_grad_(False)
            self.cls_embedding.requires_grad_(False)
            self.pos_embedding.requires_grad_(False)

    def forward(self, tiles: torch.Tensor) -> torch.Tensor:
        """tiles [N, n_channels, image_size, image_size] -> [N, tokens_per_tile, text_dim]."""
        a = self.args
        if tiles.dim() != 4 or tuple(tiles.shape[1:]) != (a.n_channels, a.image_size, a.image_size):
            raise ValueError(
                f"vision encoder: pixel tiles of shape {tuple(tiles.shape)}; expected "
                f"[N, {a.n_channels}, {a.image_size}, {a.image_size}] (vision.image_size={a.image_size})"
            )
        N = tiles.shape[0]
        # Patches in row-major order, each flattened as (channel, row, column).
        patches = F.unfold(tiles, kernel_size=a.patch_size, stride=a.patch_size).transpose(1, 2)
        h = self.patch_embed(patches)
        h = torch.cat([h, self.cls_embedding.to(h.dtype).expand(N, 1, -1)], dim=1)
        h = self.norm_pre(h + self.pos_embedding.to(h.dtype))

        rope = vision_rope_cos_sin(a, tiles.device)
        for block in self.layers.values():
            h = block(h, rope)
        h = self.norm_post(h)[:, :-1]  # drop the class token

        h = self.adapter(pixel_shuffle(h, a.shuffle_factor))
        return self.projector(h)

    @torch.no_grad()
    def init_weights(self) -> None:
        """As Hugging Face initialises Llama 4: linears Normal(0, init_std) with zero biases,
        LayerNorms the identity, class and position embeddings Normal(0, dim^-0.5)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=self.args.init_std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.cls_embedding, std=self.args.dim**-0.5)
        nn.init.normal_(self.pos_embedding, std=self.args.dim**-0.5)


# ---------------------------------------------------------------- early fusion


def scatter_image_features(
    h: torch.Tensor, tokens: torch.Tensor, features: torch.Tensor, patch_token_id: int
) -> torch.Tensor:
    """Return h [B, T, D] with the rows at `patch_token_id` positions of tokens [B, T] replaced,
    in row-major order, by the rows of features [N, tokens_per_tile, D] (tile after tile).
    Differentiable with respect to both h and features."""
    is_patch = tokens == patch_token_id
    rows = features.reshape(-1, h.shape[-1])
    n_slots = int(is_patch.sum())
    if n_slots != rows.shape[0]:
        raise ValueError(
            f"{n_slots} <|patch|> tokens (id {patch_token_id}) but {rows.shape[0]} image feature rows "
            f"(features of shape {tuple(features.shape)}); each tile needs exactly "
            f"{features.shape[1] if features.dim() == 3 else '?'} <|patch|> tokens"
        )
    return h.masked_scatter(is_patch[..., None], rows.to(h.dtype))


# ---------------------------------------------------------------- Hugging Face names

_HF_TOP = {
    "patch_embed.weight": "vision_model.patch_embedding.linear.weight",
    "cls_embedding": "vision_model.class_embedding",
    "pos_embedding": "vision_model.positional_embedding_vlm",
    "norm_pre.weight": "vision_model.layernorm_pre.weight",
    "norm_pre.bias": "vision_model.layernorm_pre.bias",
    "norm_post.weight": "vision_model.layernorm_post.weight",
    "norm_post.bias": "vision_model.layernorm_post.bias",
    "adapter.w1.weight": "vision_model.vision_adapter.mlp.fc1.weight",
    "adapter.w2.weight": "vision_model.vision_adapter.mlp.fc2.weight",
    "projector.weight": "multi_modal_projector.linear_1.weight",
}
_HF_LAYER = {  # inside layers.{i} <-> vision_model.model.layers.{i}
    "attention_norm": "input_layernorm",
    "attention.wq": "self_attn.q_proj",
    "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "feed_forward.w1": "mlp.fc1",
    "feed_forward.w2": "mlp.fc2",
}
_HERD_TOP = {v: k for k, v in _HF_TOP.items()}
_HERD_LAYER = {v: k for k, v in _HF_LAYER.items()}
HF_PREFIXES = ("vision_model.", "multi_modal_projector.")


def _rename(name: str, top: dict, layer: dict, layer_re: str, layer_fmt: str) -> str | None:
    if name in top:
        return top[name]
    m = re.fullmatch(layer_re, name)
    if m and m["module"] in layer:
        return layer_fmt.format(i=m["i"], module=layer[m["module"]], param=m["param"])
    return None


def vision_state_dict_to_hf(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """VisionEncoder.state_dict() -> Hugging Face names under `vision_model.` and
    `multi_modal_projector.` (as in Llama4ForConditionalGeneration). Tensors are shared."""
    out = {}
    for name, tensor in sd.items():
        hf = _rename(
            name, _HF_TOP, _HF_LAYER,
            r"layers\.(?P<i>\d+)\.(?P<module>.+)\.(?P<param>weight|bias)",
            "vision_model.model.layers.{i}.{module}.{param}",
        )
        if hf is None:
            raise KeyError(f"vision_state_dict_to_hf: no Hugging Face name for parameter {name!r}")
        out[hf] = tensor
    return out


def vision_state_dict_from_hf(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face Llama 4 state dict -> VisionEncoder names. Keys outside `vision_model.` and
    `multi_modal_projector.` (the text model) are skipped, so a whole checkpoint can be passed."""
    out = {}
    for name, tensor in sd.items():
        if not name.startswith(HF_PREFIXES):
            continue
        herd = _rename(
            name, _HERD_TOP, _HERD_LAYER,
            r"vision_model\.model\.layers\.(?P<i>\d+)\.(?P<module>.+)\.(?P<param>weight|bias)",
            "layers.{i}.{module}.{param}",
        )
        if herd is None:
            raise KeyError(f"vision_state_dict_from_hf: unknown Hugging Face vision parameter {name!r}")
        out[herd] = tensor
    return out
