"""A small text-only source: one local text file (or Python's pydoc topics), tokenized by bytes,
packed into rows of seq_len + 1, and served as deterministic global batches split by rank.

Its state is two integers, so a resumed run gets exactly the batches it would have got.
"""
from __future__ import annotations

import os

import torch

from data.specials import special_token_id


def default_documents() -> list[str]:
    """The English text of Python's own documentation topics: present on every machine."""
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


def read_documents(path: str | None) -> list[str]:
    if path is None:
        return default_documents()
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data.path={path!r} is not a file")
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    docs = [d for d in text.split("\n\n\n") if d.strip()]
    if not docs:
        raise ValueError(f"data.path={path!r} holds no text")
    return docs


class TextBatches:
    """Global batch `step` = rows [step * G, (step + 1) * G) of a per-epoch permutation of all
    packed rows, G = batch_size * world_size; rank r gets rows r * batch_size ... of it. So a
    run on N ranks sees exactly the rows one process with batch_size * N sees."""

    def __init__(self, path: str | None, seq_len: int, batch_size: int, vocab_size: int,
                 rank: int = 0, world_size: int = 1, seed: int = 0):
        bos, eos = special_token_id("begin_of_text", vocab_size), special_token_id("end_of_text", vocab_size)
        stream: list[int] = []
        for doc in read_documents(path):
            stream += [bos, *doc.encode("utf-8"), eos]
        n_rows = (len(stream) - 1) // seq_len
        self.global_batch = batch_size * world_size
        if n_rows < self.global_batch:
            raise ValueError(f"the text has {len(stream)} tokens: too few for one global batch of "
                             f"{self.global_batch} rows of {seq_len}; lower train.batch_size or train.seq_len")
        data = torch.tensor(stream[: n_rows * seq_len + 1])
        self.inputs = data[:-1].view(n_rows, seq_len)
        self.targets = data[1:].view(n_rows, seq_len)
        self.batch_size, self.rank, self.seed = batch_size, rank, seed
        self.state_is_global = True  # every rank holds the same position: any layout resumes from it
        self.batches_per_epoch = n_rows // self.global_batch
        self.epoch, self.cursor = 0, 0
        self.tokens = n_rows * seq_len

    def _order(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.inputs.shape[0], generator=g)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self.cursor >= self.batches_per_epoch:
            self.epoch, self.cursor = self.epoch + 1, 0
        start = self.cursor * self.global_batch + self.rank * self.batch_size
        rows = self._order()[start: start + self.batch_size]
        self.cursor += 1
        return {"tokens": self.inputs[rows], "labels": self.targets[rows]}

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
