"""herd's model: the Llama 4 architecture as plain nn.Modules (no torch.distributed here)."""
from .args import ModelArgs, VisionArgs
from .moe import GroupedExperts, LocalDispatcher, MoE, TokenDispatcher
from .transformer import Block, Transformer

__all__ = ["ModelArgs", "VisionArgs", "Transformer", "Block", "MoE", "GroupedExperts", "TokenDispatcher", "LocalDispatcher"]
