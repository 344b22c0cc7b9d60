"""Logits parity with transformers' Llama4ForCausalLM, and conversion both ways."""
import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import Llama4ForCausalLM, Llama4TextConfig  # noqa: E402

from model.hf import args_from_hf_config, from_hf, state_dict_to_hf, to_hf  # noqa: E402

SEQ = 40


def hf_config(top_k=1, qk_norm=True, **kw):
    # 6 layers: MoE on 1, 3, 5 (step 2); NoPE on 2, 5 (interval 3); chunk 8 < SEQ; floor_scale 4 so
    # temperature tuning changes queries from position 3 on; llama3 scaling with a smoothing band.
    cfg = dict(
        vocab_size=96, hidden_size=64, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, intermediate_size=48, intermediate_size_mlp=80, num_local_experts=4,
        num_experts_per_tok=top_k, interleave_moe_layer_step=2, no_rope_layer_interval=3,
        attention_chunk_size=8, use_qk_norm=qk_norm, attn_temperature_tuning=True, floor_scale=4, attn_scale=0.3,
        rope_parameters=dict(rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0,
                             high_freq_factor=4.0, original_max_position_embeddings=16),
        max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False,
    )
    cfg.update(kw)
    c = Llama4TextConfig(**cfg)
    c._attn_implementation = "eager"
    return c


def spread_init(model: torch.nn.Module, seed: int = 0):
    """Weights with a large spread: std 0.02 would hide mistakes (a missing norm, a wrong pair)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.5 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p.shape[-2] if p.dim() == 3 else p.shape[-1]
                p.copy_(torch.randn(p.shape, generator=g) * 1.5 / fan_in**0.5)


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("top_k,qk_norm", [(1, True), (2, True), (1, False), (2, False)])
def test_logits_match_transformers(top_k, qk_norm):
    torch.manual_seed(0)
    cfg = hf_config(top_k, qk_norm)
    hf = Llama4ForCausalLM(cfg).eval()
    spread_init(hf)
    model = from_hf(hf.state_dict(), args_from_hf_config(cfg.to_dict())).eval()
    assert model.layers["1"].is_moe and not model.layers["0"].is_moe
    assert not model.layers["2"].attention.use_rope and model.layers["4"].attention.use_rope
    tokens = torch.randint(0, cfg.vocab_size, (2, SEQ))
    with torch.no_grad():
        ref = hf(tokens).logits
        out = model(tokens)
    assert ref.abs().max() > 1  # the spread init made logits that can disagree
    assert rel_err(out, ref) <= 1e-4


def test_temperature_tuning_and_chunking_matter():
    """The parity above would be vacuous if the tiny config never exercised these paths."""
    torch.manual_seed(0)
    cfg = hf_config(2)
    hf = Llama4ForCausalLM(cfg).eval()
    spread_init(hf)
    tokens = torch.randint(0, cfg.vocab_size, (1, SEQ))
    base = from_hf(hf.state_dict(), args_from_hf_config(cfg.to_dict())).eval()
    for change in (dict(attn_temperature_tuning=False), dict(attention_chunk_size=None),
                   dict(rope_scaling_factor=None)):
        args = args_from_hf_config(cfg.to_dict())
        for k, v in change.items():
            setattr(args, k, v)
        other = from_hf(hf.state_dict(), args).eval()
        with torch.no_grad():
            assert rel_err(other(tokens), base(tokens)) > 1e-3, change


def test_round_trip_through_folder(tmp_path):
    torch.manual_seed(0)
    cfg = hf_config(2)
    hf = Llama4ForCausalLM(cfg).eval()
    spread_init(hf)
    model = from_hf(hf.state_dict(), args_from_hf_config(cfg.to_dict())).eval()

    # herd -> HF folder -> transformers loads it and gives the same logits
    to_hf(model, tmp_path / "hf")
    reloaded = Llama4ForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    tokens = torch.randint(0, cfg.vocab_size, (2, SEQ))
    with torch.no_grad():
        assert rel_err(reloaded(tokens).logits, hf(tokens).logits) <= 1e-6
    # HF folder -> herd: identical weights
    back = from_hf(tmp_path / "hf")
    assert back.state_dict().keys() == model.state_dict().keys()
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    # and the HF names round-trip exactly
    sd = state_dict_to_hf(model.state_dict(), model.args)
    assert sd.keys() == hf.state_dict().keys()


def test_multimodal_checkpoint_text_part(tmp_path):
    """Released checkpoints are Llama4ForConditionalGeneration: text under language_model."""
    torch.manual_seed(0)
    cfg = hf_config(1)
    hf = Llama4ForCausalLM(cfg).eval()
    spread_init(hf)
    sd = {f"language_model.{k}": v for k, v in hf.state_dict().items()}
    sd["vision_model.patch_embedding.linear.weight"] = torch.zeros(3, 3)
    model = from_hf(sd, args_from_hf_config({"model_type": "llama4", "text_config": cfg.to_dict()}))
    tokens = torch.randint(0, cfg.vocab_size, (1, SEQ))
    with torch.no_grad():
        assert rel_err(model(tokens), hf(tokens).logits) <= 1e-4


def test_from_hf_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        from_hf(tmp_path)
    cfg = hf_config(1).to_dict()
    cfg["moe_layers"] = [0, 1]
    with pytest.raises(ValueError, match="moe_layers"):
        args_from_hf_config(cfg)
    with pytest.raises(ValueError, match="names herd does not know"):
        from_hf({"model.layers.0.mystery.weight": torch.zeros(1)}, args_from_hf_config(hf_config(1).to_dict()))
