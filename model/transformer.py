"""The Llama 4 model: token embeddings (with image features scattered over the <|patch|> slots
when the model has a vision encoder), interleaved dense/MoE blocks with iRoPE attention, final
norm and output head. Read top to bottom; the pieces live in layers.py, moe.py and vision.py."""
from __future__ import annotations

import math

import torch
from torch import nn

from .args import ModelArgs
from .attention import AttentionLayout
from .layers import Attention, FeedForward, RMSNorm, rope_cos_sin, rope_inv_freq
from .moe import MoE
from .vision import VisionEncoder, scatter_image_features


class Block(nn.Module):
    """Pre-norm residual block: h + attention(norm(h)), then h + ffn(norm(h)), where ffn is a
    dense SwiGLU or an MoE layer. Under MetaP each branch is scaled by residual_multiplier
    (CompleteP's 1 / depth multiplier); it is 1 otherwise."""

    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.layer = layer
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args, layer)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.is_moe = args.is_moe_layer(layer)
        self.feed_forward = MoE(args) if self.is_moe else FeedForward(args.dim, args.ffn_hidden)
        self.residual_multiplier = args.residual_multiplier

    def branch(self, out: torch.Tensor) -> torch.Tensor:
        return out if self.residual_multiplier == 1.0 else out * self.residual_multiplier

    def forward(self, h, rope, positions, layout: AttentionLayout):
        """Returns (h, router losses [2] or None, tokens per expert [E] or None)."""
        h = h + self.branch(self.attention(self.attention_norm(h), rope, positions, layout))
        if self.is_moe:
            out, losses, counts = self.feed_forward(self.ffn_norm(h))
            return h + self.branch(out), losses, counts
        return h + self.branch(self.feed_forward(self.ffn_norm(h))), None, None


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args.validate()
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        # A ModuleDict keyed by layer index keeps names stable when parallel/ wraps blocks.
        self.layers = nn.ModuleDict({str(i): Block(args, i) for i in range(args.n_layers)})
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        # Early fusion: the encoder maps pixel tiles to rows of text-model width.
        self.vision = VisionEncoder(args.vision, args.dim) if args.vision.enabled else None

    @property
    def moe_layers(self) -> list[int]:
        return [i for i in range(self.args.n_layers) if self.args.is_moe_layer(i)]

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        images: torch.Tensor | None = None,
        return_router_stats: bool = False,
        layout=None,
        image_rows: torch.Tensor | None = None,
        output_fn=None,
    ):
        """tokens [B, T] -> logits [B, T, vocab].

        positions [B, T] (default 0..T-1) drive RoPE, chunk boundaries and temperature tuning;
        doc_ids [B, T] keep packed documents from attending to each other. images
        [N, 3, image_size, image_size] are the pixel tiles of the batch in the order of their
        <|patch|> groups (row-major over tokens); each fills tokens_per_tile <|patch|> slots. With
        `return_router_stats`, also returns router losses [2] (aux, z; mean over MoE layers) and
        tokens per expert [n_moe_layers, E].

        Context parallelism (parallel/context.py) passes part of each row: its own `layout` (an
        object with AttentionLayout's `attend`) and `image_rows`, the rows of the flattened image
        features that fill this part's <|patch|> slots, in order.

        `output_fn(hidden, head)`: returned instead of the logits, with the final normed hidden
        states [B, T, dim] and the output head (hidden -> logits, MetaP's multiplier included),
        for losses that make the logits chunk by chunk (train/distill.py)."""
        B, T = tokens.shape
        h = self.tok_embeddings(tokens)
        if images is not None:
            if self.vision is None:
                raise ValueError(
                    f"images of shape {tuple(images.shape)} given to a model without a vision encoder; "
                    "set model.vision.enabled=true or leave images out"
                )
            # Runs even for zero tiles, so every data-parallel rank calls the encoder each step.
            features = self.vision(images.to(h.dtype))
            if image_rows is not None:
                features = features.flatten(0, -2)[image_rows]
            h = scatter_image_features(h, tokens, features, self.args.patch_token_id)
        if layout is None:
            layout = AttentionLayout(B, T, self.args.attention_chunk_size, positions, doc_ids, tokens.device)
        if positions is None:
            positions = torch.arange(T, device=tokens.device).expand(B, T)
        rope = rope_cos_sin(rope_inv_freq(self.args, tokens.device), positions)

        losses, counts = [], []
        for block in self.layers.values():
            h, layer_losses, layer_counts = block(h, rope, positions, layout)
            if layer_losses is not None:
                losses.append(layer_losses)
                counts.append(layer_counts)
        if output_fn is not None:
            logits = output_fn(self.norm(h), self.head)
        else:
            logits = self.head(self.norm(h))
        if not return_router_stats:
            return logits
        if losses:
            return logits, torch.stack(losses).mean(0), torch.stack(counts)
        return logits, h.new_zeros(2, dtype=torch.float32), torch.zeros(0, self.args.n_experts, dtype=torch.long)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Final normed hidden states -> logits."""
        logits = self.output(h)
        if self.args.logit_multiplier != 1.0:  # MetaP's readout multiplier
            logits = logits * self.args.logit_multiplier
        return logits

    @torch.no_grad()
    def init_weights(self) -> None:
        """Normal(0, init_std) everywhere; the projections that write into the residual stream
        (attention wo, ffn w2, expert w2) scaled by 1/sqrt(2 * n_layers) so the residual's
        variance does not grow with depth. The vision encoder initialises itself."""
        std = self.args.init_std
        out_std = std / math.sqrt(2 * self.args.n_layers)
        for name, p in self.named_parameters():
            if name.startswith("vision."):
                continue
            if p.dim() == 1:
                nn.init.ones_(p)
            elif name.endswith(("wo.weight", "w2.weight", "experts.w2")):
                nn.init.normal_(p, std=out_std)
            else:
                nn.init.normal_(p, std=std)
        for name, b in self.named_buffers():
            if name.endswith("expert_bias"):
                b.zero_()  # aux-free balancing starts unbiased (and meta-built models need a value)
        if self.vision is not None:
            self.vision.init_weights()
