"""MetaP (train/metap.py): every parameter is classified, the multipliers follow the table at
other widths and depths and are all 1 at the base shapes (where MetaP is bitwise the standard
parametrisation), an exported MetaP model computes herd's logits in transformers, and 2 ranks
(FSDP, and EP) train like one process under MetaP."""
import math

import pytest
import torch

from tests.helpers import compose, run_ranks

TINY = ["+model=tiny"]
# 4x the tiny model's width (heads scale, head_dim stays), 2x its depth, base = tiny.
WIDE = ["model.dim=512", "model.n_heads=16", "model.n_kv_heads=8", "model.ffn_hidden=1536", "model.expert_hidden=768",
        "model.n_layers=8", "model.metap_base.dim=128", "model.metap_base.n_heads=4", "model.metap_base.ffn_hidden=384",
        "model.metap_base.expert_hidden=192", "model.metap_base.n_layers=4", "model.vision.projector_output_dim=512",
        "model.vision.vision_output_dim=512"]


def _args(overrides):
    from train.config import model_args

    return model_args(compose(overrides))


def test_every_parameter_of_every_preset_is_classified():
    from model import Transformer
    from train.metap import classify

    for preset in ("tiny", "scout", "maverick", "behemoth"):
        with torch.device("meta"):
            model = Transformer(_args([f"+model={preset}", "optim.metap=true"]))
        classes = {classify(name)[0] for name, _ in model.named_parameters()}
        assert {"embedding", "output", "norm", "hidden"} <= classes, preset
    with pytest.raises(ValueError, match="no rule for parameter 'layers.0.attention.new_gate.weight'"):
        classify("layers.0.attention.new_gate.weight")
    # parallel/'s wrappers do not change the class
    assert classify("layers.1._checkpoint_wrapped_module.feed_forward.experts.w2") == ("hidden", "expert")


def test_multipliers_follow_the_widths_and_depth():
    from model import Transformer
    from train.metap import multipliers

    args = _args(TINY + WIDE + ["optim.metap=true"])
    assert args.logit_multiplier == 0.25 and args.residual_multiplier == 0.5
    with torch.device("meta"):
        model = Transformer(args)
    params = dict(model.named_parameters())
    s = args.init_std
    expect = {  # name: (init std, lr, weight decay, eps) multipliers
        "tok_embeddings.weight": (s, 1, 1, 1),
        "output.weight": (s, 1, 1, 1),
        "norm.weight": (0, 1, 0, 1),
        "layers.0.attention.wq.weight": (s / 2, 1 / 4, 4, 1 / 4),
        "layers.0.attention.wo.weight": (s / 2 / math.sqrt(8), 1 / 4, 4, 1 / 4),
        "layers.0.feed_forward.w1.weight": (s / 2, 1 / 4, 4, 1 / 4),
        "layers.0.feed_forward.w2.weight": (s / 2 / math.sqrt(8), 1 / 4, 4, 1 / 4),
        "layers.1.feed_forward.router.weight": (s / 2, 1 / 4, 4, 1 / 4),
        "layers.1.feed_forward.experts.w2": (s / 2 / math.sqrt(8), 1 / 4, 4, 1 / 4),
        "vision.patch_embed.weight": (s, 1, 1, 1),
    }
    for name, want in expect.items():
        got = multipliers(name, params[name], args)
        assert (got.init_std, got.lr, got.weight_decay, got.eps) == pytest.approx(want), name


def test_at_the_base_shapes_metap_is_the_standard_parametrisation():
    from train.build import build_model
    from train.optim import build_optimizer

    cfg_sp, cfg_mp = compose(TINY), compose(TINY + ["optim.metap=true"])
    a_sp, a_mp = _args(TINY), _args(TINY + ["optim.metap=true"])
    sp, mp = build_model(a_sp, 0), build_model(a_mp, 0, use_metap=True)
    assert all(torch.equal(a, b) for a, b in zip(sp.state_dict().values(), mp.state_dict().values()))
    opt = build_optimizer(mp, cfg_mp.optim, a_mp)
    assert {g["lr"] for g in opt.param_groups} == {cfg_sp.optim.lr}
    assert {g["eps"] for g in opt.param_groups} == {cfg_sp.optim.eps}


def test_metap_init_and_groups_at_4x_width():
    from train.build import build_model
    from train.optim import build_optimizer

    cfg = compose(TINY + WIDE + ["optim.metap=true"])
    args = _args(TINY + WIDE + ["optim.metap=true"])
    model = build_model(args, 0, use_metap=True)
    wq = model.layers["0"].attention.wq.weight
    assert wq.std().item() == pytest.approx(args.init_std / 2, rel=0.02)
    opt = build_optimizer(model, cfg.optim, args)
    assert opt.param_groups[0]["lr_multiplier"] == 1.0 and opt.param_groups[0]["lr"] == cfg.optim.lr
    group_of = {id(p): g for g in opt.param_groups for p in g["params"]}
    g = group_of[id(wq)]
    assert (g["lr"], g["weight_decay"], g["eps"]) == pytest.approx(
        (cfg.optim.lr / 4, cfg.optim.weight_decay * 4, cfg.optim.eps / 4))
    assert group_of[id(model.norm.weight)]["weight_decay"] == 0


def test_exported_metap_model_computes_herds_logits(tmp_path):
    transformers = pytest.importorskip("transformers")
    from model import Transformer
    from model.hf import from_hf, to_hf
    from tests.model.test_hf_export import text_args
    from tests.model.test_hf_parity import rel_err, spread_init

    args = text_args(residual_multiplier=0.5, logit_multiplier=0.25)
    torch.manual_seed(0)
    model = Transformer(args)
    spread_init(model)
    model.eval()
    to_hf(model, tmp_path)
    hf = transformers.Llama4ForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    tokens = torch.randint(0, args.vocab_size, (2, 40))
    with torch.no_grad():
        ours, theirs = model(tokens), hf(tokens).logits
        unfolded = Transformer(text_args()).eval()
        unfolded.load_state_dict(model.state_dict())
        assert rel_err(unfolded(tokens), ours) > 1e-2  # the multipliers matter: folding is not vacuous
        assert rel_err(ours, theirs) <= 1e-5
        back = from_hf(tmp_path)  # folded weights, multipliers 1: the same function
        assert rel_err(back(tokens), ours) <= 1e-5


# ---------------------------------------------------------------- layouts

STEPS = 5
TRAIN = TINY + ["data=text", f"train.steps={STEPS}", "train.seq_len=128", "optim.lr=3e-3", "optim.warmup_steps=2",
                "model.router_aux_loss_coef=0", "optim.metap=true", "model.metap_base.dim=64",
                "model.metap_base.n_heads=2", "model.metap_base.n_layers=2", "model.metap_base.expert_hidden=96"]


def _train(overrides):
    from train.loop import train

    return [r["loss"] for r in train(compose(overrides))]


def test_metap_two_ranks_train_like_one_process(tmp_path):
    one = _train(TRAIN + ["train.batch_size=4", f"run.dir={tmp_path}/one"])
    for extra in ([], ["parallel.ep=2"]):
        two = run_ranks(_train, 2, TRAIN + ["train.batch_size=2", f"run.dir={tmp_path}/two{len(extra)}", *extra])
        assert two[0] == two[1]
        for step, (a, b) in enumerate(zip(one, two[0])):
            assert b == pytest.approx(a, rel=1e-5), (step, extra)


def test_transfer_across_batch_and_horizon():
    from train.metap import transfer

    same = transfer(3e-3, 0.1, proxy_batch_tokens=1024, proxy_tokens=10**6, batch_tokens=1024, tokens=10**6)
    assert (same.lr, same.weight_decay) == pytest.approx((3e-3, 0.1))
    t = transfer(3e-3, 0.1, proxy_batch_tokens=1024, proxy_tokens=10**6, batch_tokens=4096, tokens=8 * 10**6,
                 horizon_exponent=0.5)
    assert t.lr == pytest.approx(3e-3 * 2 / math.sqrt(8))
    # the AdamW timescale, as a fraction of the run, is unchanged
    tau = lambda lr, wd, b, d: b / (lr * wd * d)  # noqa: E731
    assert tau(t.lr, t.weight_decay, 4096, 8 * 10**6) == pytest.approx(tau(3e-3, 0.1, 1024, 10**6))
    with pytest.raises(ValueError, match="batch_tokens=0 must be positive"):
        transfer(3e-3, 0.1, proxy_batch_tokens=1024, proxy_tokens=10**6, batch_tokens=0, tokens=10**6)


def test_proxies_keep_their_presets_pattern_and_are_their_base():
    from train.metap import width_ratios

    for preset, ratio in (("scout", 8), ("maverick", 8), ("behemoth", 16)):
        big, proxy = _args([f"+model={preset}", "optim.metap=true"]), _args([f"+model={preset}_proxy", "optim.metap=true"])
        for field in ("interleave_moe_layer_step", "nope_layer_interval", "attention_chunk_size", "use_qk_norm", "top_k",
                      "shared_expert", "head_dim", "attn_temperature_tuning"):
            assert getattr(big, field) == getattr(proxy, field), (preset, field)
        assert [big.is_nope_layer(i) for i in range(8)] == [proxy.is_nope_layer(i) for i in range(8)]
        assert set(width_ratios(big).values()) == {ratio} and set(width_ratios(proxy).values()) == {1.0}
        assert (big.metap_base.dim, big.metap_base.n_layers) == (proxy.dim, proxy.n_layers)
