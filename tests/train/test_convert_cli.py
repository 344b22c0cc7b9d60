"""launch/convert_hf.py both ways on a checkpoint that training wrote."""
import subprocess
import sys

import pytest
import torch

from tests.helpers import ROOT

transformers = pytest.importorskip("transformers")


def run(args):
    out = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def test_checkpoint_to_hf_and_back(tmp_path):
    run(["launch/pretrain.py", "+model=tiny", "train.steps=3", "train.seq_len=64", f"run.dir={tmp_path}/run",
         f"checkpoint.export_hf={tmp_path}/exported"])
    ckpt = tmp_path / "run/checkpoints/step-00000003"
    run(["launch/convert_hf.py", "to-hf", str(ckpt), str(tmp_path / "hf")])
    # the end-of-run export (checkpoint.export_hf) wrote the same weights
    from safetensors.torch import load_file

    exported, converted = load_file(tmp_path / "exported/model.safetensors"), load_file(tmp_path / "hf/model.safetensors")
    assert exported.keys() == converted.keys() and all(torch.equal(exported[k], converted[k]) for k in exported)

    from model import ModelArgs, Transformer
    from train.checkpoint import load_checkpoint
    from omegaconf import OmegaConf

    args = ModelArgs(**OmegaConf.to_container(OmegaConf.load(tmp_path / "run/config.yaml").model))
    herd = Transformer(args)
    load_checkpoint(str(ckpt), herd)
    # the tiny preset has a vision encoder, so the folder is a Llama4ForConditionalGeneration
    hf = transformers.Llama4ForConditionalGeneration.from_pretrained(tmp_path / "hf", attn_implementation="eager")
    hf.eval()
    tokens = torch.randint(0, args.vocab_size, (1, 100))  # longer than the 64-token chunk
    with torch.no_grad():
        ref, out = hf(input_ids=tokens).logits, herd(tokens)
    assert ((out - ref).abs().max() / ref.abs().max()) < 1e-5

    # HF folder -> herd checkpoint -> a new run starts from those weights
    run(["launch/convert_hf.py", "from-hf", str(tmp_path / "hf"), str(tmp_path / "herd")])
    back = Transformer(args)
    load_checkpoint(str(tmp_path / "herd"), back)
    for k, v in herd.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    out = run(["launch/pretrain.py", "+model=tiny", "train.steps=1", "train.seq_len=64", f"run.dir={tmp_path}/run2",
               f"checkpoint.load={tmp_path}/herd"])
    assert "loaded weights from" in out.stdout + out.stderr


def test_convert_errors(tmp_path):
    out = subprocess.run([sys.executable, "launch/convert_hf.py", "to-hf", str(tmp_path), str(tmp_path / "o")],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode != 0 and "not a herd checkpoint" in out.stderr
    out = subprocess.run([sys.executable, "launch/convert_hf.py", "from-hf", str(tmp_path), str(tmp_path / "o")],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode != 0 and "config.json" in out.stderr
