"""Build the batch source the config asks for. Every kind yields dicts with `tokens` and
`labels` [B, T] (labels aligned with tokens, -100 where there is no target); the passkey source
adds `positions` and `doc_ids`, the shard loader those, `images` and skip counters. All have
state_dict/load_state_dict.

The data is built before the model, so a bad source or a tokenizer that does not fit the model
stops the run within seconds, before any weights exist."""
from __future__ import annotations

from data.args import DataArgs
from data.passkey import PasskeyBatches
from data.text import TextBatches
from model import ModelArgs


def build_data(args: DataArgs, model: ModelArgs, seq_len: int, batch_size: int, rank: int, world_size: int,
               seed: int, stall_timeout_s: float = 0):
    """`stall_timeout_s`: with loader workers, a batch that takes longer raises data.loader.DataStall."""
    if args.kind == "text":
        return TextBatches(args.path, seq_len, batch_size, model.vocab_size, rank, world_size, seed)
    if args.kind == "passkey":
        return PasskeyBatches(args.path, seq_len, batch_size, model.vocab_size, rank, world_size, seed,
                              digits=args.passkey_digits, filler=args.passkey_filler,
                              loss=args.passkey_loss)
    from data import MultimodalLoader

    loader = MultimodalLoader(args, rank=rank, world_size=world_size, batch_size=batch_size, seq_len=seq_len,
                              seed=seed, num_workers=args.num_workers, timeout_s=stall_timeout_s)
    check_tokenizer_fits(loader.tokenizer, args.tokenizer, model)
    return loader


def check_sources(args: DataArgs) -> None:
    """The shards `args` names exist (FileNotFoundError naming them otherwise), without building a
    loader; the sample set is built if it is asked for and missing."""
    if args.kind == "shards":
        from data.loader import resolve_urls

        for source in args.resolved_sources():
            resolve_urls(source.urls)


def check_tokenizer_fits(tokenizer, name: str, model: ModelArgs) -> None:
    """The tokenizer's ids must exist in the model's embedding, and its <|patch|> id must be the
    one the model fills with image features."""
    if tokenizer.vocab_size > model.vocab_size:
        raise ValueError(f"data.tokenizer={name!r} has {tokenizer.vocab_size} tokens but "
                         f"model.vocab_size={model.vocab_size}; use a model whose vocabulary holds the tokenizer's")
    if model.vision.enabled and tokenizer.ids.patch != model.patch_token_id:
        raise ValueError(f"data.tokenizer={name!r} puts <|patch|> at id {tokenizer.ids.patch} but "
                         f"model.patch_token_id={model.patch_token_id}: image features would land on the wrong "
                         f"tokens; set model.patch_token_id={tokenizer.ids.patch} (or use the model's tokenizer)")
