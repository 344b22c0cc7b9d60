import sys

import numpy as np
import pytest
import torch

from data.bpe import save_tiktoken_model, train_bpe
from data.tokenizer import (
    IGNORE_INDEX,
    LLAMA4_NAMED_SPECIAL_TOKENS,
    Tokenizer,
    encode_document,
    image_block_length,
    image_token_ids,
    load_mergeable_ranks,
    special_token_names,
    tiny_tokenizer_path,
)
from data.vision import ImageTiles, VideoFrames

# Llama 4's published ids (DESIGN.md section 3).
LLAMA4_IDS = {
    "<|begin_of_text|>": 200000,
    "<|end_of_text|>": 200001,
    "<|eot|>": 200008,
    "<|image_start|>": 200080,
    "<|image_end|>": 200081,
    "<|tile_x_separator|>": 200084,
    "<|tile_y_separator|>": 200085,
    "<|image|>": 200090,
    "<|patch|>": 200092,
    "<|header_start|>": 200005,
    "<|finetune_right_pad|>": 200018,
    "<|reasoning_thinking_end|>": 201143,
}


def test_llama4_special_layout():
    names = special_token_names(2048)
    assert len(names) == len(set(names)) == 2048
    assert len(LLAMA4_NAMED_SPECIAL_TOKENS) == 1144
    for name, llama_id in LLAMA4_IDS.items():
        assert names[llama_id - 200000] == name
    assert names[1144] == "<|reserved_special_token_0|>" and names[-1] == "<|reserved_special_token_903|>"


def test_tiny_tokenizer_loads_with_offsets():
    tok = Tokenizer.tiny()
    assert (tok.base_vocab, tok.vocab_size) == (4096, 4352)
    for name, llama_id in LLAMA4_IDS.items():
        if llama_id - 200000 < 256:
            assert tok.special_tokens[name] == 4096 + llama_id - 200000
    ids = tok.ids
    assert (ids.bos, ids.eos, ids.eot, ids.image_start, ids.image_end) == (4096, 4097, 4104, 4176, 4177)
    assert (ids.tile_x, ids.tile_y, ids.image, ids.patch) == (4180, 4181, 4186, 4188)
    assert (ids.video_start, ids.video_end) == (4178, 4179)


@pytest.mark.parametrize(
    "text",
    [
        "Hello, world!",
        "  two  spaces\n\nand lines\t",
        "ünïcödé 日本語 🙂 ok",
        "x" * 30000,
        "def f(x):\n    return x ** 2  # 12345678",
    ],
    ids=["ascii", "whitespace", "unicode", "long-run", "code"],
)
def test_round_trip(text):
    tok = Tokenizer.tiny()
    ids = tok.encode(text, bos=True, eos=True)
    assert ids[0] == tok.ids.bos and ids[-1] == tok.ids.eos
    assert all(0 <= i < tok.base_vocab for i in ids[1:-1])
    assert tok.decode(ids[1:-1]) == text


def test_special_looking_text_stays_text():
    tok = Tokenizer.tiny()
    ids = tok.encode("<|image|><|patch|>")
    assert tok.ids.patch not in ids and tok.ids.image not in ids
    assert tok.decode(ids) == "<|image|><|patch|>"


def test_tiny_tokenizer_compresses_english():
    tok = Tokenizer.tiny()
    text = "The for statement is used to iterate over the elements of a sequence."
    assert len(tok.encode(text)) < len(text) / 3


# sha256 of data.sample.sample_corpus() on the Python the shipped tokenizer was trained on (3.11):
# the corpus is Python's own pydoc topics, whose text changes between Python releases.
TRAINED_ON_CORPUS = "d9dc35bce5ab1a24ed7f4c3c9b7c22450410e9d68279e3426db458c6be371621"


def test_shipped_tiny_tokenizer_is_reproducible(tmp_path):
    import hashlib

    from data.sample import sample_corpus, train_tiny_tokenizer

    if hashlib.sha256(sample_corpus().encode()).hexdigest() != TRAINED_ON_CORPUS:
        pytest.skip(f"Python {sys.version.split()[0]}'s pydoc topics are not the text the shipped tokenizer was "
                    "trained on (Python 3.11's)")
    train_tiny_tokenizer(tmp_path / "tiny.model")
    assert (tmp_path / "tiny.model").read_bytes() == tiny_tokenizer_path().read_bytes()


def test_trainer_and_full_size_special_offsets(tmp_path):
    from data.sample import sample_corpus

    text = sample_corpus()[:20000]
    ranks = train_bpe(text, 300)
    assert len(ranks) == 300 and ranks[b"a"] == ord("a") and b" the" in ranks
    assert train_bpe(text, 300) == ranks
    path = tmp_path / "t.model"
    save_tiktoken_model(ranks, path)
    tok = Tokenizer(path, num_special_tokens=2048)
    assert tok.vocab_size == 300 + 2048
    for name, llama_id in LLAMA4_IDS.items():
        assert tok.special_tokens[name] == 300 + llama_id - 200000
    assert tok.decode(tok.encode(" lowest newer")) == " lowest newer"


def test_bad_tokenizer_file_names_the_problem(tmp_path):
    bad = tmp_path / "bad.model"
    bad.write_text("YQ== 0\nYg== 2\n")
    with pytest.raises(ValueError, match="ranks must be"):
        load_mergeable_ranks(bad)
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        Tokenizer.load(tmp_path / "missing.model")


@pytest.mark.parametrize("grid", [(1, 1), (1, 2), (2, 1), (2, 3), (4, 4)])
def test_image_layout_matches_transformers(grid):
    tok = Tokenizer.tiny()
    ids = image_token_ids(tok.ids, grid, patches=3)
    assert len(ids) == image_block_length(grid, patches=3)
    names = {v: k for k, v in tok.special_tokens.items()}
    ours = "".join(names[i] for i in ids)
    llama4 = pytest.importorskip("transformers.models.llama4.processing_llama4")
    assert ours == llama4.Llama4Processor._prompt_split_image(None, grid, 3)


def test_image_layout_by_hand():
    tok = Tokenizer.tiny()
    i = tok.ids
    P = [i.patch] * 2
    assert image_token_ids(i, (1, 1), 2) == [i.image_start, i.image, *P, i.image_end]
    assert image_token_ids(i, (1, 2), 2) == [i.image_start, *P, i.tile_x, *P, i.tile_y, i.image, *P, i.image_end]


def test_encode_document_order_patches_and_targets():
    tok = Tokenizer.tiny()
    img = ImageTiles(torch.randn(3, 3, 336, 336), (1, 2))
    vid = VideoFrames(torch.randn(2, 3, 336, 336))
    doc = encode_document(tok, ["first words", img, "middle", vid, "last words"])
    t = doc.tokens
    assert t[0] == tok.ids.bos and t[-1] == tok.ids.eos
    assert (t == tok.ids.patch).sum() == 144 * (3 + 2) == 144 * doc.pixels.shape[0]
    assert doc.span_tiles == [3, 1, 1] and len(doc.spans) == 3
    assert torch.equal(doc.pixels[:3], img.pixels) and torch.equal(doc.pixels[3:], vid.pixels)
    # text between media keeps its order
    text_only = tok.decode([x for x in t if x < tok.base_vocab])
    assert text_only == "first wordsmiddlelast words"
    assert list(t).index(tok.ids.video_start) < doc.spans[1][0] and doc.spans[2][1] == list(t).index(tok.ids.video_end)
    # targets: next token, except where the next token is media, and at the end
    media = np.zeros(len(t), dtype=bool)
    for s, e in doc.spans:
        media[s:e] = True
    media[list(t).index(tok.ids.video_start)] = media[list(t).index(tok.ids.video_end)] = True
    expect = np.where(media[1:], IGNORE_INDEX, t[1:])
    assert (doc.targets[:-1] == expect).all() and doc.targets[-1] == IGNORE_INDEX
