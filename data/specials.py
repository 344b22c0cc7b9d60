"""Where Llama 4's special tokens sit in a vocabulary: right after the BPE tokens, in Llama 4's
order, 2048 of them after a base vocabulary of 100k tokens or more (Llama 4's: 200000 + 2048 =
202048), 256 after a smaller one (herd's tiny tokenizer: 4096 + 256 = 4352). Every part of herd
that needs a special id derives it here (or from a loaded Tokenizer, which uses these rules).

Pure Python, so that the byte-level text source can use it without the tokenizer's imports.
"""
from __future__ import annotations


def _reserved(name: str, count: int, start: int = 0) -> list[str]:
    return [f"<|{name}_reserved_special_token_{i}|>" for i in range(start, start + count)]


# Llama 4's named special tokens in id order (200000 ... 201143); the rest up to the count
# of specials are <|reserved_special_token_i|>.
LLAMA4_NAMED_SPECIAL_TOKENS: list[str] = (
    ["<|begin_of_text|>", "<|end_of_text|>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>"]
    + ["<|header_start|>", "<|header_end|>", "<|eom|>", "<|eot|>", "<|step|>"]
    + _reserved("text_post_train", 6)
    + ["<|python_start|>", "<|python_end|>", "<|finetune_right_pad|>"]
    + _reserved("text_post_train", 61, 8)
    + ["<|image_start|>", "<|image_end|>"]
    + _reserved("vision", 2)
    + ["<|tile_x_separator|>", "<|tile_y_separator|>"]
    + _reserved("vision", 4, 2)
    + ["<|image|>"]
    + _reserved("vision", 1, 6)
    + ["<|patch|>"]
    + _reserved("vision", 1041, 7)
    + _reserved("reasoning", 8)
    + ["<|reasoning_thinking_start|>", "<|reasoning_thinking_end|>"]
)

# herd's names for the reserved vision tokens it gives a meaning to (docs/data.md).
VIDEO_START = "<|vision_reserved_special_token_0|>"
VIDEO_END = "<|vision_reserved_special_token_1|>"

_LARGE_BASE = 100_000  # base vocabularies at least this big get Llama 4's full 2048 specials


def special_token_count(base_vocab: int) -> int:
    """How many special tokens follow a BPE vocabulary of `base_vocab` tokens."""
    return 2048 if base_vocab >= _LARGE_BASE else 256


def special_token_names(count: int) -> list[str]:
    """The first `count` Llama 4 special tokens, padded with <|reserved_special_token_i|>."""
    named = LLAMA4_NAMED_SPECIAL_TOKENS[:count]
    return named + [f"<|reserved_special_token_{i}|>" for i in range(count - len(named))]


def special_token_base(vocab_size: int) -> int:
    """The first special id of a full vocabulary (BPE + specials) of `vocab_size` tokens."""
    base = vocab_size - 2048 if vocab_size - 2048 >= _LARGE_BASE else vocab_size - 256
    if base < 256:
        raise ValueError(f"vocab_size={vocab_size} is too small for byte tokens plus 256 special tokens")
    return base


def special_token_id(name: str, vocab_size: int) -> int:
    """The id of special token `<|name|>` in a full vocabulary of `vocab_size` tokens; e.g.
    special_token_id("patch", 202048) == 200092."""
    return special_token_base(vocab_size) + LLAMA4_NAMED_SPECIAL_TOKENS.index(f"<|{name}|>")
