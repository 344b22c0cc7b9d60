"""to_hf on the configs that are easy to export wrong: transformers loads the folder without a
warning, computes herd's logits, every dtype in config.json is the weights' dtype, and from_hf reads
back the same ModelArgs."""
import json
import logging
import warnings
from contextlib import contextmanager

import pytest
import torch

from model import ModelArgs, Transformer
from model.args import VisionArgs
from model.hf import args_from_hf_config, from_hf, hf_config_from_args, to_hf

from .test_hf_parity import rel_err, spread_init

transformers = pytest.importorskip("transformers")
from transformers import AutoConfig, Llama4ForCausalLM, Llama4ForConditionalGeneration  # noqa: E402

SEQ = 40
VOCAB = 352  # 96 "BPE" ids + 256 specials: <|patch|> is 96 + 92
PATCH = 188


def text_args(**kw) -> ModelArgs:
    # 4 layers: MoE on 1, 3 (step 2); NoPE on 3; chunk 8 < SEQ; llama3 scaling. Each case turns one off.
    args = dict(vocab_size=96, dim=64, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=16, max_seq_len=256,
                ffn_hidden=80, expert_hidden=48, n_experts=4, top_k=2, interleave_moe_layer_step=2,
                nope_layer_interval=4, attention_chunk_size=8, floor_scale=4, attn_scale=0.3, rope_theta=10000.0,
                rope_scaling_factor=8.0, rope_high_freq_factor=4.0, rope_original_max_seq_len=16,
                router_aux_loss_coef=0.01, init_std=0.03)
    args.update(kw)
    return ModelArgs(**args).validate()


def vision_args(**kw) -> ModelArgs:
    # 84px tiles of 14px patches: 6 x 6 patches, pixel-shuffled to 9 tokens per tile.
    vision = VisionArgs(enabled=True, image_size=84, patch_size=14, dim=64, n_layers=2, n_heads=4, mlp_hidden=256,
                        projector_input_dim=96, projector_output_dim=96, vision_output_dim=96, init_std=0.03)
    return text_args(vocab_size=VOCAB, vision=vision, patch_token_id=PATCH, **kw)


# Llama 4 presets never use these values; each once exported a folder transformers could not load or
# ran differently. Fields with no Hugging Face counterpart keep their defaults: the llama3 band when
# there is no scaling, and training-only ones (router_z_loss_coef, load_balance, vision.freeze).
PLAIN_ROPE = dict(rope_scaling_factor=None, rope_high_freq_factor=1.0, rope_original_max_seq_len=8192)
EDGES = {
    "no_nope_layer": dict(nope_layer_interval=0),
    "nope_interval_past_the_last_layer": dict(nope_layer_interval=5),
    "every_layer_nope": dict(nope_layer_interval=1),
    "no_moe_layer": dict(interleave_moe_layer_step=0),
    "every_layer_moe": dict(interleave_moe_layer_step=1),
    "no_chunk": dict(attention_chunk_size=None),
    "plain_rope": PLAIN_ROPE,
    "tied_embeddings": dict(tie_embeddings=True),
    "all_of_them": dict(nope_layer_interval=0, interleave_moe_layer_step=0, attention_chunk_size=None,
                        tie_embeddings=True, use_qk_norm=False, **PLAIN_ROPE),
}


def herd_model(args: ModelArgs) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(args)
    spread_init(model)
    return model.eval()


def dtype_fields(cfg: dict, prefix: str = "") -> dict:
    """Every key of a config.json (nested configs too) that names a dtype."""
    out = {}
    for key, value in cfg.items():
        if isinstance(value, dict):
            out.update(dtype_fields(value, f"{prefix}{key}."))
        elif "dtype" in key:
            out[prefix + key] = value
    return out


@contextmanager
def no_warnings():
    """Fails on any Python warning or transformers log record at WARNING or above."""
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:
        logger.removeHandler(handler)
    assert not records, [r.getMessage() for r in records]
    assert not caught, [str(w.message) for w in caught]


@pytest.mark.parametrize("change", EDGES.values(), ids=EDGES.keys())
def test_text_edge_configs(change, tmp_path):
    args = text_args(**change)
    model = herd_model(args)
    to_hf(model, tmp_path)
    assert dtype_fields(json.loads((tmp_path / "config.json").read_text())) == {"dtype": "float32"}

    with no_warnings():
        cfg = AutoConfig.from_pretrained(tmp_path)
        hf = Llama4ForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    # transformers reads herd's layer structure, not one of its own defaults
    n = args.n_layers
    assert cfg.no_rope_layers == [int(not args.is_nope_layer(i)) for i in range(n)]
    assert cfg.moe_layers == [i for i in range(n) if args.is_moe_layer(i)]
    assert [layer.feed_forward.__class__.__name__ == "Llama4TextMoe" for layer in hf.model.layers] == [
        args.is_moe_layer(i) for i in range(n)]
    assert cfg.dtype == hf.dtype == torch.float32

    tokens = torch.randint(0, args.vocab_size, (2, SEQ))
    with torch.no_grad():
        ref, out = hf(tokens).logits, model(tokens)
    assert ref.abs().max() > 1  # the spread init made logits that can disagree
    assert rel_err(out, ref) <= 1e-4

    back = from_hf(tmp_path)
    assert back.args == args
    assert back.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in back.state_dict().items())
    assert (back.output.weight is back.tok_embeddings.weight) == args.tie_embeddings
    # and so does the config as transformers would save it again
    assert args_from_hf_config(cfg.to_dict()) == args


def test_edge_configs_differ_from_the_defaults():
    """The parity above is not vacuous: each turned-off feature changes the logits on SEQ tokens."""
    tokens = torch.randint(0, 96, (1, SEQ))
    base = herd_model(text_args())
    for name in ("no_nope_layer", "every_layer_nope", "no_chunk", "plain_rope"):
        other = Transformer(text_args(**EDGES[name])).eval()
        other.load_state_dict(base.state_dict())
        with torch.no_grad():
            assert rel_err(other(tokens), base(tokens)) > 1e-3, name


@pytest.mark.parametrize("change", [{}, EDGES["all_of_them"]], ids=["preset_like", "all_edges"])
def test_vision_model_float32(change, tmp_path):
    args = vision_args(**change)
    model = herd_model(args)
    to_hf(model, tmp_path)
    fields = dtype_fields(json.loads((tmp_path / "config.json").read_text()))
    assert fields == {"dtype": "float32", "text_config.dtype": "float32", "vision_config.dtype": "float32"}

    with no_warnings():
        cfg = AutoConfig.from_pretrained(tmp_path)
        hf = Llama4ForConditionalGeneration.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert cfg.dtype == cfg.text_config.dtype == cfg.vision_config.dtype == torch.float32
    assert {p.dtype for p in hf.parameters()} == {torch.float32}

    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 96, (1, SEQ), generator=g)
    tokens[0, 5:14] = PATCH  # one tile's 9 tokens
    images = torch.randn(1, 3, 84, 84, generator=g)
    with torch.no_grad():
        ref, out = hf(input_ids=tokens, pixel_values=images).logits, model(tokens, images=images)
    assert ref.abs().max() > 1
    assert rel_err(out, ref) <= 1e-4

    assert from_hf(tmp_path).args == args
    assert args_from_hf_config(cfg.to_dict()) == args


def test_vision_model_bfloat16(tmp_path):
    args = vision_args()
    to_hf(herd_model(args), tmp_path, dtype=torch.bfloat16)
    fields = dtype_fields(json.loads((tmp_path / "config.json").read_text()))
    assert fields == {"dtype": "bfloat16", "text_config.dtype": "bfloat16", "vision_config.dtype": "bfloat16"}
    with no_warnings():
        cfg = AutoConfig.from_pretrained(tmp_path)
        hf = Llama4ForConditionalGeneration.from_pretrained(tmp_path)
    assert cfg.dtype == cfg.text_config.dtype == cfg.vision_config.dtype == torch.bfloat16
    assert {p.dtype for p in hf.parameters()} == {torch.bfloat16}
    back = from_hf(tmp_path)
    assert back.args == args and {p.dtype for p in back.parameters()} == {torch.bfloat16}


def test_config_dtype_follows_the_weights():
    args = text_args()
    for dtype in (torch.float32, torch.bfloat16, "float16"):
        name = str(dtype).removeprefix("torch.")
        assert hf_config_from_args(args, dtype)["dtype"] == name
        assert dtype_fields(hf_config_from_args(vision_args(), dtype)) == {
            "dtype": name, "text_config.dtype": name, "vision_config.dtype": name}


def test_what_transformers_cannot_represent_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="shared_expert=False"):
        to_hf(herd_model(text_args(shared_expert=False)), tmp_path)
    cfg = hf_config_from_args(text_args())
    cfg["layer_types"] = ["chunked_attention"] * 4  # the NoPE layer 3 chunked too
    with pytest.raises(ValueError, match="layer_types"):
        args_from_hf_config(cfg)


def test_export_over_an_older_sharded_export_replaces_it(tmp_path, monkeypatch):
    """A rerun's checkpoint.export_hf=DIR over the last run's sharded export: no old shard or index
    stays beside the new weights (from_hf used to read the old index, hence the old weights), and
    files to_hf does not write (a tokenizer) stay."""
    import model.hf as hf

    old, new = herd_model(text_args()), herd_model(text_args())
    spread_init(new, seed=1)
    monkeypatch.setattr(hf, "_SHARD_BYTES", 100_000)
    to_hf(old, tmp_path / "hf")
    assert (tmp_path / "hf/model.safetensors.index.json").exists()
    (tmp_path / "hf/tokenizer.json").write_text("{}")
    monkeypatch.setattr(hf, "_SHARD_BYTES", 5 * 2**30)
    to_hf(new, tmp_path / "hf")
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no temporary folder left
    back = from_hf(tmp_path / "hf")
    for k, v in new.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


def test_a_folder_that_mixes_two_exports_is_an_error(tmp_path, monkeypatch):
    import shutil

    import model.hf as hf

    monkeypatch.setattr(hf, "_SHARD_BYTES", 100_000)
    to_hf(herd_model(text_args()), tmp_path / "sharded")
    monkeypatch.setattr(hf, "_SHARD_BYTES", 5 * 2**30)
    to_hf(herd_model(text_args()), tmp_path / "single")
    shutil.copy(tmp_path / "single/model.safetensors", tmp_path / "sharded")  # what to_hf used to leave
    with pytest.raises(ValueError, match="does not list model.safetensors: .* mixes two exports"):
        from_hf(tmp_path / "sharded")
    (tmp_path / "sharded/model.safetensors.index.json").unlink()  # no index: two files hold the same tensors
    with pytest.raises(ValueError, match="which another \\*.safetensors file holds too"):
        from_hf(tmp_path / "sharded")


def test_export_refuses_a_folder_that_is_not_an_export(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="holds no config.json"):
        to_hf(herd_model(text_args()), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
