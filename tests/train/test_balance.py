"""train/balance.py: per-layer expert-load metrics, the aux-loss-free bias update, and the MoE
modules in the order of the model's tokens-per-expert rows."""
import json

import pytest
import torch

from model import ModelArgs, MoE, Transformer
from train.balance import expert_metrics, moe_layers, update_expert_bias


def test_expert_metrics_by_hand():
    counts = torch.tensor([[4, 0, 2, 2],  # 8 of 8 slots: mean 2, max 4
                           [0, 0, 0, 0],  # a layer that saw no tokens
                           [3, 1, 2, 1]])  # 7 of 8 slots: mean 1.75, one slot dropped
    row = expert_metrics(counts, [1, 3, 5], routed_slots=8)
    assert row == {
        "moe/layer1/imbalance": 2.0, "moe/layer1/tokens_max": 4, "moe/layer1/tokens_min": 0, "moe/layer1/dropped": 0,
        "moe/layer3/imbalance": 0.0, "moe/layer3/tokens_max": 0, "moe/layer3/tokens_min": 0, "moe/layer3/dropped": 8,
        "moe/layer5/imbalance": pytest.approx(3 / 1.75), "moe/layer5/tokens_max": 3, "moe/layer5/tokens_min": 1,
        "moe/layer5/dropped": 1,
    }
    assert all(type(row[k]) is int for k in row if not k.endswith("imbalance"))
    json.dumps(row)  # a metrics.jsonl row
    # A perfectly balanced layer reads 1.
    assert expert_metrics(torch.tensor([[5, 5, 5]]), [0], 15) == {
        "moe/layer0/imbalance": 1.0, "moe/layer0/tokens_max": 5, "moe/layer0/tokens_min": 5, "moe/layer0/dropped": 0}


def _moe(load_balance: str, bias=None) -> MoE:
    moe = MoE(ModelArgs(dim=8, expert_hidden=4, n_experts=4, n_layers=1, n_heads=2, n_kv_heads=1,
                        load_balance=load_balance))
    if bias is not None:
        moe.expert_bias.copy_(torch.tensor(bias))
    return moe


def test_update_expert_bias_by_hand():
    first = _moe("aux_free", [0.5, 0.0, 0.0, -0.25])
    plain = _moe("aux_loss")
    last = _moe("aux_free", [0.0, 0.0, 0.0, 0.0])
    counts = torch.tensor([[5, 1, 3, 3],  # mean 3: expert 0 over, 1 under, 2 and 3 on the mean
                           [9, 0, 0, 0],  # the layer without a bias: its row is skipped, not reused
                           [0, 2, 4, 6]])  # mean 3: 0 and 1 under, 2 and 3 over
    update_expert_bias([first, plain, last], counts, rate=0.125)
    assert first.expert_bias.tolist() == [0.375, 0.125, 0.0, -0.25]
    assert plain.expert_bias is None
    assert last.expert_bias.tolist() == [0.125, 0.125, -0.125, -0.125]
    assert first.expert_bias.dtype == torch.float32

    # The step does not grow with the imbalance: only its sign counts.
    update_expert_bias([last], torch.tensor([[1000, 0, 0, 0]]), rate=0.125)
    assert last.expert_bias.tolist() == [0.0, 0.25, 0.0, 0.0]


def _tiny(**kw) -> Transformer:
    torch.manual_seed(0)
    fields = dict(vocab_size=64, dim=16, n_layers=12, n_heads=2, n_kv_heads=1, ffn_hidden=32, expert_hidden=16,
                  n_experts=4, interleave_moe_layer_step=2, max_seq_len=64, attention_chunk_size=None,
                  vision={"enabled": False})
    args = ModelArgs(**{**fields, **kw})
    return Transformer(args)


def test_moe_layers_in_layer_order():
    model = _tiny()
    assert model.moe_layers == [1, 3, 5, 7, 9, 11]  # 12 layers: "10" and "11" come after "9"
    layers = moe_layers(model)
    assert [id(m) for m in layers] == [id(model.layers[str(i)].feed_forward) for i in model.moe_layers]

    # Row j of the model's tokens-per-expert table is the routing of moe_layers(model)[j].
    seen = {}
    hooks = [m.register_forward_hook(lambda mod, inp, out: seen.__setitem__(id(mod), out[2])) for m in layers]
    _, _, counts = model(torch.randint(0, 64, (2, 16)), return_router_stats=True)
    for h in hooks:
        h.remove()
    assert counts.shape == (6, 4)
    assert len({tuple(r) for r in counts.tolist()}) > 1  # rows differ, so a wrong order would show
    assert torch.equal(torch.stack([seen[id(m)] for m in layers]), counts)


def test_moe_layers_through_wrapped_blocks():
    from parallel import parallelize_model

    model = _tiny()
    expected = [id(model.layers[str(i)].feed_forward) for i in model.moe_layers]
    model = parallelize_model(model, None, activation_checkpointing=True)  # what the trainer does on one process
    assert [id(m) for m in moe_layers(model)] == expected
    assert moe_layers(_tiny(n_experts=0, interleave_moe_layer_step=0)) == []
