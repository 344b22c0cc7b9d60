import numpy as np
import torch

from data.packing import Packer
from data.tokenizer import IGNORE_INDEX, TokenizedDocument

PAD = 99


def text_doc(tokens):
    t = np.asarray(tokens, dtype=np.int64)
    targets = np.append(t[1:], IGNORE_INDEX)
    return TokenizedDocument(t, targets, [], [], torch.empty(0, 3, 4, 4))


def media_doc(before, block_len, after, tiles=1, fill=1.0):
    """Text, one image block of block_len tokens (7s) holding `tiles` tiles, text."""
    t = np.asarray(before + [7] * block_len + after, dtype=np.int64)
    media = np.zeros(len(t), dtype=bool)
    media[len(before) : len(before) + block_len] = True
    targets = np.where(np.append(media[1:], False), IGNORE_INDEX, np.append(t[1:], IGNORE_INDEX))
    targets[-1] = IGNORE_INDEX
    span = (len(before), len(before) + block_len)
    return TokenizedDocument(t, targets, [span], [tiles], torch.full((tiles, 3, 4, 4), fill))


def feeder(docs):
    it = iter(docs)
    return lambda: next(it, None)


def test_rows_positions_doc_ids_labels():
    p = Packer(batch_size=2, seq_len=8, pad_id=PAD, tile_shape=(3, 4, 4))
    b = p.next_batch(feeder([text_doc([1, 2, 3]), text_doc([4, 5, 6, 7, 8, 9, 10]), text_doc([11, 12])]))
    assert b["tokens"].tolist() == [[1, 2, 3, 4, 5, 6, 7, 8], [9, 10, 11, 12, PAD, PAD, PAD, PAD]]
    assert b["positions"].tolist() == [[0, 1, 2, 0, 1, 2, 3, 4], [0, 1, 0, 1, 0, 0, 0, 0]]
    assert b["doc_ids"].tolist() == [[0, 0, 0, 1, 1, 1, 1, 1], [0, 0, 1, 1, -1, -1, -1, -1]]
    # the cut document keeps its true next token (9) as the label of its last packed token (8)
    assert b["labels"].tolist() == [[2, 3, -100, 5, 6, 7, 8, 9], [10, -100, 12, -100, -100, -100, -100, -100]]
    assert b["images"].shape == (0, 3, 4, 4)
    assert p.next_batch(feeder([])) is None


def test_positions_without_reset_count_the_row():
    p = Packer(batch_size=1, seq_len=6, pad_id=PAD, reset_positions=False, tile_shape=(3, 4, 4))
    b = p.next_batch(feeder([text_doc([1, 2]), text_doc([3, 4, 5])]))
    assert b["positions"].tolist() == [[0, 1, 2, 3, 4, 0]]
    assert b["doc_ids"].tolist() == [[0, 0, 1, 1, 1, -1]]


def test_image_block_is_never_split_and_tiles_follow_rows():
    p = Packer(batch_size=3, seq_len=8, pad_id=PAD, tile_shape=(3, 4, 4))
    docs = [text_doc([1, 2, 3, 4, 5]), media_doc([20], 5, [21], tiles=2, fill=1.0), media_doc([], 3, [30], fill=2.0)]
    b = p.next_batch(feeder(docs))
    toks = b["tokens"].tolist()
    # row 0: doc0 + "20"; the 5-token block does not fit in the 2 left, so the row is padded
    assert toks[0] == [1, 2, 3, 4, 5, 20, PAD, PAD]
    assert toks[1] == [7, 7, 7, 7, 7, 21, PAD, PAD]  # the next 3-token block does not fit either
    assert toks[2] == [7, 7, 7, 30, PAD, PAD, PAD, PAD]
    assert b["positions"][1].tolist() == [0, 1, 2, 3, 4, 5, 0, 0]  # continuation restarts at 0
    n_patch_like = int((b["tokens"] == 7).sum())
    assert n_patch_like == 8
    assert b["images"].shape[0] == 3 and b["images"][:2].eq(1.0).all() and b["images"][2].eq(2.0).all()
    assert b["labels"][0, 5] == -100  # "20" is followed by the image: no target
    assert b["labels"][1, 4] == 21  # the last block token predicts the text after it


def test_block_too_long_for_a_row_drops_the_rest_of_the_document():
    p = Packer(batch_size=1, seq_len=4, pad_id=PAD, tile_shape=(3, 4, 4))
    f = feeder([media_doc([1], 6, [2]), text_doc([5, 6])])
    assert p.next_batch(f)["tokens"].tolist() == [[1, PAD, PAD, PAD]]  # the block waits for an empty row
    b = p.next_batch(f)
    assert b["tokens"].tolist() == [[5, 6, PAD, PAD]] and p.dropped_media == 1
    assert b["images"].shape[0] == 0


def test_carry_across_batches_and_finite_end():
    p = Packer(batch_size=1, seq_len=4, pad_id=PAD, tile_shape=(3, 4, 4))
    f = feeder([text_doc(list(range(1, 11)))])
    rows = []
    while (b := p.next_batch(f)) is not None:
        rows.append(b["tokens"][0].tolist())
    assert rows == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, PAD, PAD]]
