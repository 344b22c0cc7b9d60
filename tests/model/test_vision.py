"""The vision encoder against Hugging Face transformers' Llama4VisionModel + Llama4MultiModalProjector."""
from __future__ import annotations

import pytest
import torch

from model.vision import (
    VisionArgs,
    VisionEncoder,
    pixel_shuffle,
    scatter_image_features,
    vision_state_dict_from_hf,
    vision_state_dict_to_hf,
)

transformers = pytest.importorskip("transformers")
from transformers import Llama4Config, Llama4VisionConfig  # noqa: E402
from transformers.models.llama4 import modeling_llama4 as hf  # noqa: E402

pytestmark = pytest.mark.xdist_group("model_test_vision")  # its module fixtures: built once

PATCH_TOKEN_ID = 200092

# 84 / 14 = 6 patches per side: asymmetric enough that a swapped row/column shows.
TINY = dict(image_size=84, patch_size=14, n_channels=3, dim=64, n_layers=2, n_heads=4, mlp_hidden=256,
            projector_input_dim=96, projector_output_dim=96, vision_output_dim=96)
TINY_TEXT_DIM = 80


def hf_vision_config(a: VisionArgs, attn_implementation: str = "eager") -> Llama4VisionConfig:
    cfg = Llama4VisionConfig(
        image_size=a.image_size, patch_size=a.patch_size, num_channels=a.n_channels, hidden_size=a.dim,
        num_hidden_layers=a.n_layers, num_attention_heads=a.n_heads, intermediate_size=a.mlp_hidden,
        norm_eps=a.norm_eps, rope_theta=a.rope_theta, pixel_shuffle_ratio=a.pixel_shuffle_ratio,
        projector_input_dim=a.projector_input_dim, projector_output_dim=a.projector_output_dim,
        vision_output_dim=a.vision_output_dim,
    )
    cfg._attn_implementation = attn_implementation
    return cfg


def hf_modules(a: VisionArgs, text_dim: int, attn_implementation: str = "eager"):
    vcfg = hf_vision_config(a, attn_implementation)
    config = Llama4Config(vision_config=vcfg.to_dict(), text_config={"hidden_size": text_dim})
    return hf.Llama4VisionModel(vcfg), hf.Llama4MultiModalProjector(config)


@pytest.fixture(scope="module")
def tiny_pair():
    """HF modules with large-spread random weights, and a VisionEncoder loaded from them."""
    torch.manual_seed(0)
    a = VisionArgs(enabled=True, **TINY)
    hf_vision, hf_projector = hf_modules(a, TINY_TEXT_DIM)
    with torch.no_grad():
        for p in [*hf_vision.parameters(), *hf_projector.parameters()]:
            p.copy_(torch.randn_like(p) * 0.7 + (1.0 if p.dim() == 1 and p.shape[0] == a.dim else 0.0))
    hf_sd = {f"vision_model.{k}": v for k, v in hf_vision.state_dict().items()}
    hf_sd.update({f"multi_modal_projector.{k}": v for k, v in hf_projector.state_dict().items()})
    ours = VisionEncoder(a, TINY_TEXT_DIM)
    ours.load_state_dict(vision_state_dict_from_hf(hf_sd), strict=True)
    return a, hf_vision.eval(), hf_projector.eval(), ours.eval(), hf_sd


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_matches_hf(tiny_pair, attn_implementation):
    a, hf_vision, hf_projector, ours, _ = tiny_pair
    hf_vision.config._attn_implementation = attn_implementation
    tiles = torch.randn(3, a.n_channels, a.image_size, a.image_size)
    with torch.no_grad():
        ref = hf_projector(hf_vision(tiles).last_hidden_state)
        out = ours(tiles)
    assert out.shape == (3, 9, TINY_TEXT_DIM) == ref.shape
    assert ref.abs().max() > 1.0  # large-spread weights: a mistake cannot hide in tiny numbers
    assert rel_err(out, ref) <= 1e-4


def test_tiles_are_independent(tiny_pair):
    _, _, _, ours, _ = tiny_pair
    tiles = torch.randn(2, 3, 84, 84)
    with torch.no_grad():
        both, first = ours(tiles), ours(tiles[:1])
    assert rel_err(both[:1], first) <= 1e-5


def test_pixel_shuffle_matches_hf():
    x = torch.randn(2, 36, 8)
    assert torch.equal(pixel_shuffle(x, 2), hf.pixel_shuffle(x, 0.5))
    x = torch.randn(2, 576, 12)
    assert torch.equal(pixel_shuffle(x, 2), hf.pixel_shuffle(x, 0.5))


def test_state_dict_round_trip(tiny_pair):
    _, _, _, ours, hf_sd = tiny_pair
    sd = ours.state_dict()
    to_hf = vision_state_dict_to_hf(sd)
    assert set(to_hf) == set(hf_sd)
    assert all(torch.equal(to_hf[k], hf_sd[k]) for k in hf_sd)
    back = vision_state_dict_from_hf(to_hf)
    assert set(back) == set(sd) and all(back[k] is sd[k] for k in sd)


def test_from_hf_skips_text_and_rejects_unknown_vision_names(tiny_pair):
    *_, hf_sd = tiny_pair
    with_text = {**hf_sd, "language_model.model.norm.weight": torch.ones(3)}
    assert set(vision_state_dict_from_hf(with_text)) == set(vision_state_dict_from_hf(hf_sd))
    with pytest.raises(KeyError, match="vision_model.model.layers.0.mystery.weight"):
        vision_state_dict_from_hf({"vision_model.model.layers.0.mystery.weight": torch.ones(1)})
    with pytest.raises(KeyError, match="bogus"):
        vision_state_dict_to_hf({"bogus": torch.ones(1)})


def test_real_size_parameter_count_and_names():
    """Scout/Maverick geometry on the meta device: same names and parameter count as HF."""
    a = VisionArgs(enabled=True)
    with torch.device("meta"):
        hf_vision, hf_projector = hf_modules(a, text_dim=5120)
        ours = VisionEncoder(a, text_dim=5120)
    hf_shapes = {f"vision_model.{k}": v.shape for k, v in hf_vision.state_dict().items()}
    hf_shapes.update({f"multi_modal_projector.{k}": v.shape for k, v in hf_projector.state_dict().items()})
    ours_shapes = {k: v.shape for k, v in vision_state_dict_to_hf(ours.state_dict()).items()}
    assert ours_shapes == hf_shapes
    n_ours = sum(p.numel() for p in ours.parameters())
    n_hf = sum(p.numel() for p in [*hf_vision.parameters(), *hf_projector.parameters()])
    assert n_ours == n_hf == 871_932_416  # 850,960,896 encoder + adapter, 20,971,520 projector
    assert a.tokens_per_tile == 144
    with torch.device("meta"):
        assert ours(torch.empty(2, 3, 336, 336)).shape == (2, 144, 5120)


def test_scatter_image_features_row_major():
    D = 4
    h = torch.zeros(2, 6, D)
    tokens = torch.tensor([[1, PATCH_TOKEN_ID, PATCH_TOKEN_ID, 2, 3, PATCH_TOKEN_ID],
                           [PATCH_TOKEN_ID, 4, 5, 6, 7, 8]])
    features = torch.arange(1, 5, dtype=torch.float32)[:, None].expand(4, D).reshape(2, 2, D)
    out = scatter_image_features(h, tokens, features, PATCH_TOKEN_ID)
    assert out[:, :, 0].tolist() == [[0, 1, 2, 0, 0, 3], [4, 0, 0, 0, 0, 0]]
    # same as HF's masked_scatter in Llama4ForConditionalGeneration
    ref = h.masked_scatter((tokens == PATCH_TOKEN_ID)[..., None], features.reshape(-1, D))
    assert torch.equal(out, ref)


def test_scatter_image_features_gradients():
    h = torch.randn(1, 5, 3, requires_grad=True)
    features = torch.randn(1, 2, 3, requires_grad=True)
    tokens = torch.tensor([[0, PATCH_TOKEN_ID, 0, PATCH_TOKEN_ID, 0]])
    scatter_image_features(h, tokens, features, PATCH_TOKEN_ID).sum().backward()
    assert h.grad[0, :, 0].tolist() == [1, 0, 1, 0, 1]
    assert torch.equal(features.grad, torch.ones(1, 2, 3))


def test_scatter_image_features_count_mismatch():
    tokens = torch.full((1, 10), PATCH_TOKEN_ID)
    with pytest.raises(ValueError, match=r"10 <\|patch\|> tokens .* 8 image feature rows"):
        scatter_image_features(torch.zeros(1, 10, 4), tokens, torch.zeros(2, 4, 4), PATCH_TOKEN_ID)


def test_wrong_tile_size_is_an_error(tiny_pair):
    _, _, _, ours, _ = tiny_pair
    with pytest.raises(ValueError, match="image_size=84"):
        ours(torch.zeros(1, 3, 56, 56))


def test_freeze_keeps_projector_trainable():
    ours = VisionEncoder(VisionArgs(enabled=True, freeze=True, **TINY), TINY_TEXT_DIM)
    trainable = [n for n, p in ours.named_parameters() if p.requires_grad]
    assert trainable == ["projector.weight"]


@pytest.mark.parametrize(
    "override, bad",
    [
        (dict(image_size=85), "image_size=85"),
        (dict(n_heads=5), "n_heads=5"),
        (dict(n_heads=32), "head dim 2"),
        (dict(pixel_shuffle_ratio=0.3), "pixel_shuffle_ratio=0.3"),
        (dict(image_size=70), "pixel_shuffle_ratio=0.5"),
        (dict(vision_output_dim=4), "vision_output_dim=4"),
        (dict(n_layers=0), "n_layers=0"),
    ],
)
def test_validate_names_the_bad_value(override, bad):
    with pytest.raises(ValueError, match=bad):
        VisionArgs(**{**TINY, **override}).validate()


def test_init_weights():
    torch.manual_seed(0)
    ours = VisionEncoder(VisionArgs(enabled=True, **TINY), TINY_TEXT_DIM)
    assert torch.equal(ours.norm_pre.weight, torch.ones(64)) and torch.equal(ours.norm_pre.bias, torch.zeros(64))
    assert torch.equal(ours.layers["0"].attention.wq.bias, torch.zeros(64))
    assert abs(ours.layers["1"].feed_forward.w1.weight.std().item() - 0.02) < 0.002
    assert abs(ours.pos_embedding.std().item() - 64**-0.5) < 0.02
