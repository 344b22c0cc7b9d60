"""iRoPE attention patterns, checked against attention computed piece by piece."""
import pytest
import torch

from model import ModelArgs, Transformer
from model.attention import AttentionLayout


def tiny(**kw):
    args = dict(vocab_size=64, dim=32, n_layers=4, n_heads=4, n_kv_heads=2, ffn_hidden=48, expert_hidden=32,
                n_experts=4, top_k=1, interleave_moe_layer_step=2, nope_layer_interval=2, attention_chunk_size=8,
                floor_scale=4)
    args.update(kw)
    torch.manual_seed(0)
    m = Transformer(ModelArgs(**args))
    m.init_weights()
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(8)
    return m.eval()


def assert_close(a, b):
    assert (a - b).abs().max() <= 1e-5 * b.abs().max()


def test_chunk_reshape_equals_explicit_mask():
    m = tiny()
    tokens = torch.randint(0, 64, (2, 32))
    fast = m(tokens)  # 32 % 8 == 0: chunks attended as separate rows
    slow = m(tokens, positions=torch.arange(32).expand(2, 32))  # explicit chunk mask
    assert_close(fast, slow)


def test_packed_documents_equal_separate_documents():
    m = tiny()
    a, b = torch.randint(0, 64, (1, 13)), torch.randint(0, 64, (1, 19))
    packed = torch.cat([a, b], 1)
    positions = torch.cat([torch.arange(13), torch.arange(19)])[None]
    doc_ids = torch.cat([torch.zeros(13), torch.ones(19)]).long()[None]
    out = m(packed, positions=positions, doc_ids=doc_ids)
    assert_close(out[:, :13], m(a))
    assert_close(out[:, 13:], m(b))


def influence_of_token_3(m):
    """Per position, the largest logit change when token 3 changes, over the largest logit."""
    tokens = torch.randint(0, 64, (1, 24))
    changed = tokens.clone()
    changed[0, 3] = (changed[0, 3] + 1) % 64
    out = m(tokens)
    return (out - m(changed)).abs().amax(-1)[0] / out.abs().max()


def test_chunked_layers_do_not_see_past_chunk():
    # Every layer chunked: the output at t depends only on t's chunk. "No influence" is not an exact
    # 0: the changed token can route to another expert, which resizes the experts' matmuls and so
    # reorders fp32 sums elsewhere (~1e-7 of the logits with several threads). Influence is >1e-2.
    d = influence_of_token_3(tiny(nope_layer_interval=0))
    assert d[3:8].min() > 1e-2
    assert d[:3].max() <= 1e-5 and d[8:].max() <= 1e-5
    # Not vacuous: without chunks the same change reaches every later position.
    d = influence_of_token_3(tiny(nope_layer_interval=0, attention_chunk_size=None))
    assert d[3:].min() > 1e-2 and d[:3].max() <= 1e-5


def test_layout_kinds():
    cpu = torch.device("cpu")
    m = AttentionLayout(2, 16, 8, None, None, cpu)
    assert m.chunks_by_reshape and m.global_segments is None
    m = AttentionLayout(2, 6, 8, None, None, cpu)
    assert m.chunked_segments is None and not m.chunks_by_reshape
    m = AttentionLayout(2, 20, 8, None, None, cpu)  # 20 % 8 != 0: segments 8, 8, 4 per row
    assert m.chunked_segments.lengths.tolist() == [8, 8, 4, 8, 8, 4] and m.global_segments is None
    one_doc = torch.zeros(2, 20, dtype=torch.long)
    assert AttentionLayout(2, 20, 8, None, one_doc, cpu).global_segments.whole_rows


@pytest.mark.parametrize("bad,match", [(dict(n_heads=6, n_kv_heads=4), "n_kv_heads=4"),
                                       (dict(top_k=5), "top_k=5"),
                                       (dict(dim=30, n_heads=4), "dim=30")])
def test_bad_args_name_the_value(bad, match):
    with pytest.raises(ValueError, match=match):
        tiny(**bad)
