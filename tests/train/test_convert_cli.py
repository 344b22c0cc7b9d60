"""launch/convert_hf.py both ways on a checkpoint that training wrote (the conversions run as the
command a user types; the training runs around them in process)."""
import json
import subprocess
import sys

import pytest
import torch

from tests.helpers import ROOT, compose

transformers = pytest.importorskip("transformers")


def run(args):
    out = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def train(*overrides):
    from train.loop import train

    return train(compose(["+model=tiny", "train.seq_len=64", "logging.wandb.mode=disabled", *overrides]))


def test_checkpoint_to_hf_and_back(tmp_path, caplog):
    train("train.steps=3", f"run.dir={tmp_path}/run", f"checkpoint.export_hf={tmp_path}/exported")
    ckpt = tmp_path / "run/checkpoints/step-00000003"
    run(["launch/convert_hf.py", "to-hf", str(ckpt), str(tmp_path / "hf")])
    # the end-of-run export (checkpoint.export_hf) wrote the same weights
    from safetensors.torch import load_file

    exported = load_file(tmp_path / "exported/model.safetensors")
    converted = load_file(tmp_path / "hf/model.safetensors")
    assert exported.keys() == converted.keys() and all(torch.equal(exported[k], converted[k]) for k in exported)
    # every level of the config names the weights' dtype
    (dtype,) = {str(t.dtype).removeprefix("torch.") for t in converted.values()}
    cfg = json.loads((tmp_path / "hf/config.json").read_text())
    assert [cfg["dtype"], cfg["text_config"]["dtype"], cfg["vision_config"]["dtype"]] == [dtype] * 3

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
    with caplog.at_level("INFO", logger="herd"):
        train("train.steps=1", f"run.dir={tmp_path}/run2", f"checkpoint.load={tmp_path}/herd")
    assert f"loaded weights from {tmp_path}/herd" in caplog.text


def test_convert_errors(tmp_path):
    """What the command prints for a folder that is neither: one line, no traceback (main() is
    the whole command)."""
    sys.path.insert(0, f"{ROOT}/launch")
    from convert_hf import main

    with pytest.raises(SystemExit, match="not a herd checkpoint"):
        main(["to-hf", str(tmp_path), str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="config.json"):
        main(["from-hf", str(tmp_path), str(tmp_path / "o")])
