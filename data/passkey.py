"""Passkey retrieval: synthetic documents that hide a number in filler text and ask for it at the
end. A model can only predict the answer's digits by finding the hidden sentence, however far
back it is, so accuracy by document length shows what a long-context phase bought
(launch/eval_long.py measures it; docs/long_context.md "Retrieval by length").

One document, byte-level tokens (as data/text.py), `depth` the fraction of the filler before
the hidden sentence:

    <|begin_of_text|> filler... The pass key is #48213. Remember it. #48213 is the pass key. filler...
    What is the pass key? The pass key is #48213.<|end_of_text|>

The key follows a marker byte (`#`) that the filler never contains (it is removed from text
filler), so finding it takes one previous-token match, which a model of a few layers reading
bytes can learn in minutes on a CPU. Without it, "key is " must be told apart from "sky is " by
a six-byte match, and the tiny model stayed at chance for 2.6M tokens (docs/long_context.md).

Every row of seq_len holds one document of a length drawn uniformly from the shortest possible
up to seq_len, and a second document in the rest of the row when it fits (else padding), so
the rows exercise every length. Rows are a pure function of (seed, global row index): state is
one cursor, and a resumed run gets exactly the batches it would have got.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch

from data.args import PASSKEY_FILLERS, PASSKEY_LOSSES
from data.specials import special_token_id
from data.text import read_documents

IGNORE_INDEX = -100  # as data.tokenizer's, without its imports
PAD_DOC_ID = -1  # as data.packing's: padding belongs to no document
KEY_MARK = "#"  # precedes the key everywhere, and nowhere in the filler
REPEAT_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
KEY_INTRO = "The pass key is " + KEY_MARK
QUESTION = "What is the pass key? " + KEY_INTRO
_LONGEST_PIECE = 120  # bytes: text filler is cut into pieces no longer, so depth lands within a piece


def hidden_sentence(key: str) -> str:
    return f"{KEY_INTRO}{key}. Remember it. {KEY_MARK}{key} is the pass key. "


def min_document_length(digits: int) -> int:
    """Tokens of a document with no filler: begin, hidden sentence, question, answer, ".", end."""
    return 2 + len(hidden_sentence("0" * digits)) + len(QUESTION) + digits + 1


@dataclass(frozen=True)
class PasskeyDocument:
    tokens: np.ndarray  # int64 [length]: begin_of_text ... end_of_text
    key: str  # the digits
    key_start: int  # index in tokens of the hidden sentence's first digit
    answer_start: int  # index in tokens of the answer's first digit; the logits at answer_start - 1 predict it
    repeat_start: int = -1  # index in tokens of the first digit of the key's repeat in the hidden sentence

    @property
    def targets(self) -> np.ndarray:
        """The next token at every position; -100 at the last (the end of the document)."""
        out = np.full_like(self.tokens, IGNORE_INDEX)
        out[:-1] = self.tokens[1:]
        return out

    @property
    def key_targets(self) -> np.ndarray:
        """The targets that only retrieval predicts: the digits of the key's repeat and of the
        answer; -100 everywhere else (the filler, the sentences, the key's first, unguessable, digits)."""
        out = np.full_like(self.tokens, IGNORE_INDEX)
        for start in (self.repeat_start, self.answer_start):
            out[start - 1: start - 1 + len(self.key)] = self.tokens[start: start + len(self.key)]
        return out


class Filler:
    """Filler bytes: consecutive pieces (sentences, or slices of long ones) from a random place of
    the repeated paragraph (kind repeat) or of a text (kind text: data.path, None: pydoc topics)."""

    def __init__(self, kind: str, path: str | None, longest: int):
        if kind not in PASSKEY_FILLERS:
            raise ValueError(f"data.passkey_filler={kind!r} is not one of {', '.join(PASSKEY_FILLERS)}")
        if kind == "repeat":
            pieces = re.findall(r"[^.]*\. ", REPEAT_FILLER)
            pieces *= longest // len(REPEAT_FILLER) + 2
        else:
            text = re.sub(r"\s+", " ", " ".join(read_documents(path)).replace(KEY_MARK, "")).strip()
            pieces = [p for s in re.split(r"(?<=[.!?]) ", text) for p in _split_long(s + " ")]
        self.text = "".join(pieces).encode("utf-8")
        self.starts = np.cumsum([0] + [len(p.encode("utf-8")) for p in pieces])  # piece boundaries, and the end
        # A filler ends at a piece boundary (so the question follows a whole sentence) that has
        # at least `longest` bytes before it; it may begin inside a piece, like an excerpt.
        self.ends = self.starts[self.starts >= longest]
        if len(self.ends) == 0:
            raise ValueError(f"data.path={path!r} holds {len(self.text)} bytes of text: too little filler for "
                             f"documents of {longest} tokens; use a longer text or data.passkey_filler=repeat")

    def take(self, rng: np.random.Generator, n: int, depth: float) -> tuple[bytes, bytes]:
        """n filler bytes split at the piece boundary nearest to depth * n: (before, after)."""
        end = int(self.ends[rng.integers(len(self.ends))])
        inside = self.starts[(self.starts >= end - n) & (self.starts <= end)] - (end - n)
        cut = int(min([0, *inside], key=lambda b: abs(b - depth * n)))
        filler = self.text[end - n: end]
        return filler[:cut], filler[cut:]


def _split_long(sentence: str) -> list[str]:
    """A sentence longer than _LONGEST_PIECE bytes, cut after spaces into pieces no longer."""
    out, piece = [], ""
    for word in sentence.split(" ")[:-1]:
        if piece and len((piece + word).encode("utf-8")) >= _LONGEST_PIECE:
            out.append(piece)
            piece = ""
        piece += word + " "
    return out + [piece] if piece else out


def make_document(rng: np.random.Generator, length: int, depth: float, digits: int, filler: Filler,
                  vocab_size: int) -> PasskeyDocument:
    """A document of exactly `length` tokens whose hidden sentence sits at `depth` of the filler."""
    if length < min_document_length(digits):
        raise ValueError(f"a passkey document of {digits} digits needs at least {min_document_length(digits)} "
                         f"tokens, not {length}")
    if not 0 <= depth <= 1:
        raise ValueError(f"depth={depth} must be in [0, 1] (the fraction of the filler before the pass key)")
    key = str(rng.integers(10 ** (digits - 1), 10 ** digits)) if digits > 1 else str(rng.integers(1, 10))
    before, after = filler.take(rng, length - min_document_length(digits), depth)
    hidden = hidden_sentence(key).encode()
    head = before + hidden[: len(KEY_INTRO)]
    body = head + hidden[len(KEY_INTRO):] + after + QUESTION.encode()
    text = body + (key + ".").encode()
    bos, eos = special_token_id("begin_of_text", vocab_size), special_token_id("end_of_text", vocab_size)
    tokens = np.concatenate([[bos], np.frombuffer(text, dtype=np.uint8), [eos]]).astype(np.int64)
    repeat = 1 + len(head) + hidden[len(KEY_INTRO):].index(KEY_MARK.encode()) + 1
    return PasskeyDocument(tokens, key, key_start=1 + len(head), answer_start=1 + len(body), repeat_start=repeat)


class PasskeyBatches:
    """Global batch `step` = global rows [step * G, (step + 1) * G), G = batch_size * world_size;
    rank r gets rows r * batch_size ... of it, so N ranks see exactly the rows one process with
    batch_size * N sees. Same constructor as data.text.TextBatches, plus the passkey knobs;
    `path` is the filler text of `filler="text"`."""

    def __init__(self, path: str | None, seq_len: int, batch_size: int, vocab_size: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0, digits: int = 5, filler: str = "repeat", loss: str = "all"):
        if not 1 <= digits <= 18:
            raise ValueError(f"data.passkey_digits={digits} must be between 1 and 18")
        self.min_length = min_document_length(digits)
        if seq_len < self.min_length:
            raise ValueError(f"train.seq_len={seq_len} is too short for a passkey document of {digits} digits "
                             f"(at least {self.min_length} tokens); raise the seq_len or lower data.passkey_digits")
        if batch_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"batch_size={batch_size}, rank={rank}, world_size={world_size}: need batch_size >= 1 "
                             "and 0 <= rank < world_size")
        if loss not in PASSKEY_LOSSES:
            raise ValueError(f"data.passkey_loss={loss!r} is not one of {', '.join(PASSKEY_LOSSES)}")
        self.filler = Filler(filler, path, seq_len)
        self.loss = loss
        self.seq_len, self.batch_size, self.vocab_size = seq_len, batch_size, vocab_size
        self.rank, self.seed, self.digits = rank, seed, digits
        self.global_batch = batch_size * world_size
        self.pad = special_token_id("finetune_right_pad", vocab_size)
        self.state_is_global = True  # every rank holds the same position: any layout resumes from it
        self.cursor = 0  # global batches handed out

    def documents_of_row(self, index: int) -> list[PasskeyDocument]:
        """Global row `index`: one document of a uniform length, and a second one in the rest of
        the row when it fits."""
        rng = np.random.default_rng([self.seed, index])
        first = int(rng.integers(self.min_length, self.seq_len + 1))
        docs = [make_document(rng, first, float(rng.random()), self.digits, self.filler, self.vocab_size)]
        if self.seq_len - first >= self.min_length:
            docs.append(make_document(rng, self.seq_len - first, float(rng.random()), self.digits, self.filler,
                                      self.vocab_size))
        return docs

    def row(self, index: int) -> dict[str, torch.Tensor]:
        """Global row `index` as packed rows look elsewhere (data/packing.py): per-document
        positions from 0 and doc_ids 0, 1; padding has doc_id -1 and no labels."""
        T = self.seq_len
        tokens = np.full(T, self.pad, dtype=np.int64)
        labels = np.full(T, IGNORE_INDEX, dtype=np.int64)
        positions = np.zeros(T, dtype=np.int64)
        doc_ids = np.full(T, PAD_DOC_ID, dtype=np.int64)
        t = 0
        for i, doc in enumerate(self.documents_of_row(index)):
            n = len(doc.tokens)
            tokens[t: t + n], labels[t: t + n] = doc.tokens, doc.targets if self.loss == "all" else doc.key_targets
            positions[t: t + n], doc_ids[t: t + n] = np.arange(n), i
            t += n
        return {k: torch.from_numpy(v) for k, v in
                (("tokens", tokens), ("labels", labels), ("positions", positions), ("doc_ids", doc_ids))}

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        first = self.cursor * self.global_batch + self.rank * self.batch_size
        rows = [self.row(first + i) for i in range(self.batch_size)]
        self.cursor += 1
        return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}

    def state_dict(self) -> dict:
        return {"cursor": self.cursor, "seed": self.seed, "seq_len": self.seq_len, "global_batch": self.global_batch,
                "digits": self.digits}

    def load_state_dict(self, state: dict) -> None:
        """A state saved with other rows (seed, seq_len, global batch, digits) is refused, naming
        the field: its cursor would point at other documents."""
        for key in ("seed", "seq_len", "global_batch", "digits"):
            if key in state and int(state[key]) != getattr(self, key):
                raise ValueError(f"the saved passkey stream has {key}={state[key]}, this one {getattr(self, key)}")
        self.cursor = int(state["cursor"])
