"""Segment attention (model/attention.py) is exact: the same outputs and gradients as attention
with dense [B, 1, T, T] masks, on packed rows of every shape the packer and callers produce."""
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import model.transformer
from model import ModelArgs, Transformer
from model.attention import AttentionLayout

from .dense_attention import DenseLayout

H, HKV, D = 4, 2, 8


def packed_row(doc_lengths, pad=0, reset_positions=True):
    """positions and doc_ids of one row the way data/packing.py lays it out: documents 0, 1, ...
    with positions restarting at 0 (or the index in the row), then padding: doc_id -1, position 0."""
    positions, doc_ids = [], []
    for i, n in enumerate(doc_lengths):
        start = len(positions)
        positions += list(range(n)) if reset_positions else list(range(start, start + n))
        doc_ids += [i] * n
    return positions + [0] * pad, doc_ids + [-1] * pad


def rows(*layouts):
    pos, doc = zip(*layouts)
    return torch.tensor(pos), torch.tensor(doc)


def qkv(B, T, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, T, h, D, generator=g) * 2 for h in (H, HKV, HKV))
    return [t.requires_grad_() for t in (q, k, v)], torch.randn(B, T, H, D, generator=g)


def run(layout, chunked, tensors, grad_out):
    q, k, v = tensors
    out = layout.attend(q, k, v, chunked)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad_out)
    return out, dq, dk, dv


def assert_close(new, ref):
    for a, b in zip(new, ref):
        assert (a - b).abs().max() <= 1e-5 * b.abs().max(), (a - b).abs().max()


CASES = {
    # T = 45, not a multiple of 8: a 3-token document, one straddling two chunk boundaries, more.
    "straddle": (8, lambda: rows(packed_row([3, 20, 9, 13]))),
    "padding": (8, lambda: rows(packed_row([11, 17], pad=9))),
    "rows_differ": (8, lambda: rows(packed_row([64]), packed_row([5, 30, 20], pad=9), packed_row([1] * 40 + [24]))),
    "positions_in_row": (8, lambda: rows(packed_row([7, 26, 12], reset_positions=False))),
    "long_random": (32, lambda: rows(*[packed_row(lengths, pad=600 - sum(lengths))
                                       for lengths in ([150, 3, 77, 290, 40], [599], [31, 33, 65, 100, 1, 200])])),
    "no_chunks": (None, lambda: rows(packed_row([11, 20, 6], pad=4))),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("chunked", [True, False])
def test_segments_equal_dense_masks(case, chunked):
    chunk, make = CASES[case]
    positions, doc_ids = make()
    B, T = positions.shape
    tensors, grad_out = qkv(B, T)
    new = run(AttentionLayout(B, T, chunk, positions, doc_ids, torch.device("cpu")), chunked, tensors, grad_out)
    ref = run(DenseLayout(B, T, chunk, positions, doc_ids), chunked, tensors, grad_out)
    assert_close(new, ref)
    # Not vacuous: the masks change the result compared with causal attention over the whole row.
    plain = run(DenseLayout(B, T, None, None, None), chunked, tensors, grad_out)
    assert (plain[0] - ref[0]).abs().max() > 1e-2


@pytest.mark.parametrize("with_docs", [False, True])
def test_positions_without_doc_ids_and_doc_ids_without_positions(with_docs):
    # Positions that restart with no doc_ids: tokens of equal chunk index attend to each other across
    # the restart, exactly as the dense chunk mask has it (the segment's tokens are not contiguous).
    positions, doc_ids = rows(packed_row([13, 20, 9]), packed_row([30, 12]))
    B, T = positions.shape
    tensors, grad_out = qkv(B, T, seed=1)
    cases = [(positions, None), (torch.arange(T).expand(B, T), None)]
    if with_docs:
        cases = [(None, doc_ids)]
    for pos, docs in cases:
        for chunked in (True, False):
            new = run(AttentionLayout(B, T, 8, pos, docs, torch.device("cpu")), chunked, tensors, grad_out)
            ref = run(DenseLayout(B, T, 8, pos, docs), chunked, tensors, grad_out)
            assert_close(new, ref)


def test_one_document_per_row():
    positions, doc_ids = rows(packed_row([40]), packed_row([40]))
    layout = AttentionLayout(2, 40, 8, positions, doc_ids, torch.device("cpu"))
    assert layout.global_segments.whole_rows and not layout.chunked_segments.whole_rows
    tensors, grad_out = qkv(2, 40)
    for chunked in (True, False):
        ref = run(DenseLayout(2, 40, 8, positions, doc_ids), chunked, tensors, grad_out)
        assert_close(run(layout, chunked, tensors, grad_out), ref)


def test_segments_are_batched_by_length():
    positions, doc_ids = CASES["long_random"][1]()
    segments = AttentionLayout(3, 600, 32, positions, doc_ids, torch.device("cpu")).global_segments
    # Rows of 600: the documents, then the padding (40, 1, 170 tokens) as one segment each.
    assert sorted(segments.lengths.tolist()) == [1, 1, 3, 31, 33, 40, 40, 65, 77, 100, 150, 170, 200, 290, 599]
    # Up to 16 tokens share one batch (1, 1, 3: padded to 3); above, lengths rounded up to 8 steps per
    # octave share one (40, 40), each batch padded to its longest member; 31 (-> 32) and 33 (-> 36) differ.
    assert [g.shape for g in segments.groups][:3] == [(3, 3), (1, 31), (1, 33)]
    assert sorted(g.shape[1] for g in segments.groups) == [3, 31, 33, 40, 65, 77, 100, 150, 170, 200, 290, 599]
    assert sum(g.numel() for g in segments.groups) == 3 * 600 + 2 + 2

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "model"


def tiny_preset() -> ModelArgs:
    cfg = OmegaConf.load(CONFIGS / "tiny.yaml")
    cfg.pop("defaults", None)
    return ModelArgs(**OmegaConf.to_container(cfg))


def forward_backward(m, tokens, positions, doc_ids):
    m.zero_grad()
    logits, router, _ = m(tokens, positions=positions, doc_ids=doc_ids, return_router_stats=True)
    (logits.square().mean() + router.sum()).backward()
    return [logits.detach()] + [p.grad.clone() for p in m.parameters() if p.grad is not None]


def test_tiny_model_forward_backward_equals_dense_masks(monkeypatch):
    args = tiny_preset()
    torch.manual_seed(0)
    m = Transformer(args)
    m.init_weights()
    positions, doc_ids = rows(packed_row([40, 150, 9, 63, 64, 21]), packed_row([300, 17], pad=30))
    tokens = torch.randint(0, 4096, positions.shape)
    new = forward_backward(m, tokens, positions, doc_ids)
    monkeypatch.setattr(model.transformer, "AttentionLayout", DenseLayout)
    ref = forward_backward(m, tokens, positions, doc_ids)
    assert len(new) > 20
    assert_close(new, ref)
