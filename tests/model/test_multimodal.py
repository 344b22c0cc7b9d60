"""The vision encoder inside the Transformer (early fusion), against transformers'
Llama4ForConditionalGeneration, and the presets' parameter counts with vision."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from model import ModelArgs, Transformer
from model.args import VisionArgs
from model.hf import args_from_hf_config, from_hf, to_hf
from model.params import count_parameters

from .test_hf_parity import hf_config as hf_text_config
from .test_hf_parity import rel_err, spread_init

transformers = pytest.importorskip("transformers")
from transformers import Llama4Config, Llama4ForConditionalGeneration  # noqa: E402

pytestmark = pytest.mark.xdist_group("model_test_multimodal")  # its module fixtures: built once

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "model"
VOCAB = 352  # 96 "BPE" ids + 256 specials: <|patch|> is 96 + 92
PATCH = 188
SEQ = 40
# 84px tiles of 14px patches: 6 x 6 patches, pixel-shuffled to 9 tokens per tile.
TINY_VISION = dict(image_size=84, patch_size=14, num_channels=3, hidden_size=64, num_hidden_layers=2,
                   num_attention_heads=4, intermediate_size=256, projector_input_dim=96,
                   projector_output_dim=96, vision_output_dim=96, pixel_shuffle_ratio=0.5,
                   rope_parameters={"rope_type": "default", "rope_theta": 10000.0})


def hf_multimodal_config() -> Llama4Config:
    text = hf_text_config(top_k=2, vocab_size=VOCAB).to_dict()
    cfg = Llama4Config(text_config=text, vision_config=TINY_VISION, image_token_index=PATCH)
    for c in (cfg, cfg.text_config, cfg.vision_config):
        c._attn_implementation = "eager"
    return cfg


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    cfg = hf_multimodal_config()
    hf = Llama4ForConditionalGeneration(cfg).eval()
    spread_init(hf)
    args = args_from_hf_config(cfg.to_dict())
    model = from_hf(hf.state_dict(), args).eval()
    return cfg, hf, model


def batch(n_tiles_per_row=(2, 1), tokens_per_tile=9, seed=0):
    """Token rows with each tile's <|patch|> run at a fixed place, and matching pixel tiles."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 96, (len(n_tiles_per_row), SEQ), generator=g)
    for row, n in enumerate(n_tiles_per_row):
        for i in range(n):
            start = 3 + i * (tokens_per_tile + 4) + row
            tokens[row, start:start + tokens_per_tile] = PATCH
    images = torch.randn(sum(n_tiles_per_row), 3, 84, 84, generator=g)
    return tokens, images


def test_args_from_multimodal_config(pair):
    cfg, _, model = pair
    v = model.args.vision
    assert v.enabled and (v.image_size, v.dim, v.n_layers, v.n_heads, v.mlp_hidden) == (84, 64, 2, 4, 256)
    assert v.tokens_per_tile == 9 and model.args.patch_token_id == PATCH
    other = cfg.to_dict()
    other["image_token_index"] = 100
    assert args_from_hf_config(other).patch_token_id == 100


def test_logits_match_transformers_with_images(pair):
    _, hf, model = pair
    tokens, images = batch()
    with torch.no_grad():
        ref = hf(input_ids=tokens, pixel_values=images).logits
        out = model(tokens, images=images)
        text_only = model(tokens)
    assert ref.abs().max() > 1  # the spread init made logits that can disagree
    assert rel_err(out, ref) <= 1e-4
    assert rel_err(text_only, ref) > 1e-2  # the images changed the logits: the parity is not vacuous


def test_text_only_input_to_a_vision_model(pair):
    _, hf, model = pair
    tokens = torch.randint(0, 96, (2, SEQ))
    with torch.no_grad():
        ref = hf(input_ids=tokens).logits
        out = model(tokens)
        no_tiles = model(tokens, images=torch.empty(0, 3, 84, 84))
    assert rel_err(out, ref) <= 1e-4
    assert torch.equal(no_tiles, out)


def test_round_trip_through_folder(pair, tmp_path):
    _, hf, model = pair
    to_hf(model, tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["model_type"] == "llama4" and cfg["architectures"] == ["Llama4ForConditionalGeneration"]
    assert cfg["image_token_index"] == PATCH and "text_config" in cfg and "vision_config" in cfg
    reloaded = Llama4ForConditionalGeneration.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    tokens, images = batch(seed=1)
    with torch.no_grad():
        assert rel_err(reloaded(input_ids=tokens, pixel_values=images).logits,
                       hf(input_ids=tokens, pixel_values=images).logits) <= 1e-6
    assert reloaded.state_dict().keys() == hf.state_dict().keys()

    back = from_hf(tmp_path / "hf")
    assert back.args == model.args
    sd = model.state_dict()
    assert back.state_dict().keys() == sd.keys()
    for k, v in back.state_dict().items():
        assert torch.equal(v, sd[k]), k


def test_text_part_only_when_vision_is_off(pair):
    """A multimodal checkpoint loads into a text-only model: the vision weights are skipped."""
    cfg, hf, model = pair
    args = args_from_hf_config(cfg.to_dict())
    args.vision = VisionArgs()
    text = from_hf(hf.state_dict(), args).eval()
    assert text.vision is None
    tokens = torch.randint(0, 96, (1, SEQ))
    with torch.no_grad():
        assert torch.equal(text(tokens), model(tokens))
    with pytest.raises(ValueError, match="without a vision encoder"):
        text(tokens, images=torch.zeros(1, 3, 84, 84))


def tiny_preset() -> ModelArgs:
    cfg = OmegaConf.load(CONFIGS / "tiny.yaml")
    cfg.pop("defaults", None)  # the Hydra schema line of presets that have one
    return ModelArgs(**OmegaConf.to_container(cfg))


@pytest.mark.parametrize("freeze", [False, True])
def test_gradients_reach_the_vision_encoder(freeze):
    """The tiny preset on Llama 4's tile geometry: 336px tiles, 144 <|patch|> slots each."""
    args = tiny_preset()
    args.vision.freeze = freeze
    assert args.vision.enabled and args.vision.tokens_per_tile == 144 and args.patch_token_id == 4188
    torch.manual_seed(0)
    model = Transformer(args)
    model.init_weights()
    tokens = torch.randint(0, 4096, (1, 160))
    tokens[0, 8:152] = args.patch_token_id
    model(tokens, images=torch.randn(1, 3, 336, 336)).float().square().mean().backward()
    v = model.vision
    assert v.projector.weight.grad.abs().sum() > 0  # the projector trains even when frozen
    for p in (v.patch_embed.weight, v.layers["0"].attention.wq.weight, v.pos_embedding, v.adapter.w1.weight):
        assert (p.grad is None) if freeze else (p.grad.abs().sum() > 0)
    assert model.tok_embeddings.weight.grad.abs().sum() > 0


def test_init_weights_gives_vision_its_own_init():
    args = tiny_preset()
    model = Transformer(args)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(7.0)
    model.init_weights()
    v = model.vision
    assert torch.equal(v.norm_pre.bias, torch.zeros(64)) and torch.equal(v.norm_pre.weight, torch.ones(64))
    assert torch.equal(v.layers["1"].attention.wq.bias, torch.zeros(64))
    assert abs(v.pos_embedding.std().item() - 64**-0.5) < 0.02
    assert abs(v.layers["0"].feed_forward.w1.weight.std().item() - 0.02) < 0.003
    assert torch.equal(model.layers["0"].attention_norm.weight, torch.ones(args.dim))


def test_args_schema_and_validation():
    # Hydra/OmegaConf: the nested vision block is typed, so a typo is an error.
    schema = OmegaConf.structured(ModelArgs)
    cfg = OmegaConf.merge(schema, OmegaConf.create({"vision": {"enabled": True, "dim": 64, "n_heads": 2}}))
    args = ModelArgs(**OmegaConf.to_container(cfg))
    assert isinstance(args.vision, VisionArgs) and args.vision.dim == 64 and args.vision.n_layers == 34
    with pytest.raises(Exception, match="dimm"):
        OmegaConf.merge(schema, OmegaConf.create({"vision": {"dimm": 64}}))
    # vision.validate() runs only when the encoder is on
    ModelArgs(vision=VisionArgs(n_heads=5)).validate()
    with pytest.raises(ValueError, match="n_heads=5"):
        ModelArgs(vision=VisionArgs(enabled=True, n_heads=5)).validate()
    with pytest.raises(ValueError, match="patch_token_id=500"):
        ModelArgs(vocab_size=400, patch_token_id=500, vision=VisionArgs(enabled=True)).validate()
    assert ModelArgs().patch_token_id == 200092  # Llama 4's <|patch|>


@pytest.mark.parametrize("preset,total_b", [("scout", 108.6), ("maverick", 401.6)])
def test_preset_parameter_counts_with_vision(preset, total_b):
    cfg = OmegaConf.load(CONFIGS / f"{preset}.yaml")
    cfg.pop("defaults", None)  # the Hydra schema line of presets that have one
    args = ModelArgs(**OmegaConf.to_container(cfg)).validate()
    assert args.vision.enabled
    with torch.device("meta"):
        model = Transformer(args)
    counts = count_parameters(model)
    total = sum(t for t, _ in counts.values())
    active = sum(a for _, a in counts.values())
    assert counts["vision"] == (871_932_416, 0)  # counted in the total, not per text token
    assert abs(total / 1e9 - total_b) / total_b <= 0.01, total
    assert abs(active / 1e9 - 17.2) <= 0.1, active
