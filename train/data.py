"""Build the batch source the config asks for. Both kinds yield dicts with `tokens` and
`labels` [B, T] (labels aligned with tokens, -100 where there is no target); the shard loader
adds `positions`, `doc_ids`, `images` and skip counters. Both have state_dict/load_state_dict."""
from __future__ import annotations

from data.text import TextBatches


def build_data(cfg, vocab_size: int, seq_len: int, batch_size: int, rank: int, world_size: int, seed: int):
    if cfg.kind == "text":
        return TextBatches(cfg.path, seq_len, batch_size, vocab_size, rank, world_size, seed)
    from data import DataArgs, MultimodalLoader

    args = DataArgs(
        urls=cfg.urls, tokenizer=cfg.tokenizer, shuffle=cfg.shuffle, shuffle_buffer=cfg.shuffle_buffer,
        resample=cfg.resample, reset_positions=cfg.reset_positions, max_tiles=cfg.max_tiles,
        video_fps=cfg.video_fps, video_max_frames=cfg.video_max_frames, max_image_pixels=cfg.max_image_pixels,
    )
    loader = MultimodalLoader(args, rank=rank, world_size=world_size, batch_size=batch_size, seq_len=seq_len,
                              seed=seed, num_workers=cfg.num_workers)
    if loader.vocab_size > vocab_size:
        raise ValueError(f"data.tokenizer={cfg.tokenizer!r} has {loader.vocab_size} tokens but "
                         f"model.vocab_size={vocab_size}; use a model whose vocabulary holds the tokenizer's")
    return loader
