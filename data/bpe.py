"""A small byte-level BPE trainer that writes tiktoken-format `tokenizer.model` files.

It exists to build the tiny tokenizer shipped with herd (data/assets/tiny.tokenizer.model)
from the sample text, so a laptop run needs no download. The output has the same format as
the released Llama 3/4 tokenizers (one `base64(token) rank` per line, ranks 0..n-1), and the
same pre-tokenisation pattern, so data/tokenizer.py loads both the same way.

Training is the classic algorithm on word counts: pre-split the text with the Llama 4 regex,
count each distinct piece once, and repeatedly merge the most frequent adjacent pair. Pair
counts are kept incrementally (a heap with lazy invalidation) so 4k merges take seconds.
"""

from __future__ import annotations

import base64
import heapq
from collections import Counter, defaultdict
from pathlib import Path

import regex

from data.tokenizer import O200K_PATTERN


def train_bpe(text: str, vocab_size: int, pattern: str = O200K_PATTERN) -> dict[bytes, int]:
    """Return mergeable ranks {token bytes: rank}: 256 single bytes, then merges in order.

    Deterministic: ties between equally frequent pairs go to the smaller (left id, right id).
    """
    if vocab_size < 256:
        raise ValueError(f"vocab_size={vocab_size} is below 256: every single byte needs a token")
    word_counts = Counter(piece.encode("utf-8") for piece in regex.findall(pattern, text))
    words = [list(w) for w in sorted(word_counts)]  # sorted: iteration order must not matter
    freqs = [word_counts[bytes(w)] for w in words]

    vocab: list[bytes] = [bytes([i]) for i in range(256)]
    ids_of: dict[bytes, int] = {b: i for i, b in enumerate(vocab)}
    pair_count: dict[tuple[int, int], int] = defaultdict(int)
    pair_words: dict[tuple[int, int], set[int]] = defaultdict(set)
    for wi, w in enumerate(words):
        for pair in zip(w, w[1:]):
            pair_count[pair] += freqs[wi]
            pair_words[pair].add(wi)
    heap = [(-c, p) for p, c in pair_count.items()]
    heapq.heapify(heap)

    while len(vocab) < vocab_size and heap:
        neg, pair = heapq.heappop(heap)
        if pair_count.get(pair, 0) != -neg or -neg <= 0:
            continue  # stale entry: the count changed after it was pushed
        merged = vocab[pair[0]] + vocab[pair[1]]
        new_id = ids_of.get(merged)
        if new_id is None:  # the same bytes can arise from two merge paths; keep one id
            new_id = len(vocab)
            vocab.append(merged)
            ids_of[merged] = new_id
        touched: set[tuple[int, int]] = set()
        for wi in sorted(pair_words.pop(pair, ())):
            w, f = words[wi], freqs[wi]
            if not any(p == pair for p in zip(w, w[1:])):
                continue
            for p in zip(w, w[1:]):
                pair_count[p] -= f
                touched.add(p)
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == pair:
                    out.append(new_id)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            words[wi] = out
            for p in zip(out, out[1:]):
                pair_count[p] += f
                pair_words[p].add(wi)
                touched.add(p)
        pair_count.pop(pair, None)
        for p in touched:
            c = pair_count.get(p, 0)
            if c > 0:
                heapq.heappush(heap, (-c, p))
            else:
                pair_count.pop(p, None)
    return {tok: rank for rank, tok in enumerate(vocab)}


def save_tiktoken_model(ranks: dict[bytes, int], path: str | Path) -> None:
    """Write `base64(token) rank` lines sorted by rank (the tiktoken / Llama format)."""
    lines = [
        f"{base64.b64encode(tok).decode('ascii')} {rank}" for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1])
    ]
    Path(path).write_text("\n".join(lines) + "\n", encoding="ascii")
