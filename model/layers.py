"""The dense building blocks of a Llama 4 decoder: RMSNorm, RoPE, attention, SwiGLU."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .args import ModelArgs
from .attention import AttentionLayout


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 whatever the input dtype; `weight=False` gives the
    weightless norm Llama 4 applies to q and k."""

    def __init__(self, dim: int, eps: float, weight: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if weight else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        out = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x)
        return out * self.weight if self.weight is not None else out

    def reset_parameters(self) -> None:
        if self.weight is not None:
            nn.init.ones_(self.weight)


# ---------------------------------------------------------------- rotary embeddings


def rope_inv_freq(args: ModelArgs, device: torch.device | None = None) -> torch.Tensor:
    """Inverse frequencies of the rotary embedding, with llama3-style scaling when configured:
    long wavelengths are divided by the factor, short ones kept, the band between smoothed."""
    hd = args.head_size
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32, device=device) / hd))
    factor = args.rope_scaling_factor
    if factor is None:
        return inv_freq
    low_wavelen = args.rope_original_max_seq_len / args.rope_low_freq_factor
    high_wavelen = args.rope_original_max_seq_len / args.rope_high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    band = args.rope_high_freq_factor - args.rope_low_freq_factor
    if band > 0:
        smooth = (args.rope_original_max_seq_len / wavelen - args.rope_low_freq_factor) / band
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        scaled = torch.where(medium, smoothed, scaled)
    return scaled


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape [B, T, 1, head_dim / 2] for positions [B, T]."""
    angles = positions.float()[..., None] * inv_freq
    return angles.cos()[:, :, None, :], angles.sin()[:, :, None, :]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2j], x[2j+1]) of x [B, T, H, D] — Llama 4's layout, not halves."""
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).type_as(x)


# ---------------------------------------------------------------- attention


class Attention(nn.Module):
    """Grouped-query attention. RoPE layers: RoPE, then weightless qk RMSNorm, then chunked
    local causal attention. NoPE layers: no rotation, temperature-tuned queries, global causal
    attention. Both stay within the document; the batch's AttentionLayout (attention.py) says
    which tokens form a segment."""

    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_size
        self.use_rope = not args.is_nope_layer(layer)
        use_qk_norm = args.use_qk_norm and self.use_rope
        self.qk_norm = RMSNorm(self.head_dim, args.norm_eps, weight=False) if use_qk_norm else None
        self.temperature_tuning = args.attn_temperature_tuning and not self.use_rope
        self.floor_scale, self.attn_scale = args.floor_scale, args.attn_scale
        self.wq = nn.Linear(args.dim, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, args.dim, bias=False)

    def forward(self, x, rope: tuple[torch.Tensor, torch.Tensor], positions: torch.Tensor, layout: AttentionLayout):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        if self.use_rope:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
            if self.qk_norm is not None:
                q, k = self.qk_norm(q), self.qk_norm(k)
        elif self.temperature_tuning:
            scale = 1.0 + self.attn_scale * torch.log1p(torch.floor((positions.float() + 1.0) / self.floor_scale))
            q = (q * scale[:, :, None, None]).to(q.dtype)
        out = layout.attend(q, k, v, chunked=self.use_rope)
        return self.wo(out.reshape(B, T, -1))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x). Dense layers and the shared expert."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))
