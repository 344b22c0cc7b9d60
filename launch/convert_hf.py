"""Convert between herd checkpoints and Hugging Face Llama 4 folders.

    # a herd checkpoint (DCP, any layout) -> a folder Llama4ForCausalLM.from_pretrained loads
    # (Llama4ForConditionalGeneration for a model with a vision encoder)
    python launch/convert_hf.py to-hf outputs/tiny/checkpoints/step-00000100 hf/tiny [--dtype bfloat16]
    # a Hugging Face Llama 4 folder (text model, or multimodal: vision encoder included) -> a herd
    # checkpoint that training starts from with checkpoint.load=DIR
    python launch/convert_hf.py from-hf path/to/Llama-4-Scout-17B-16E herd/scout
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from model.hf import from_hf  # noqa: E402
from train.checkpoint import export_to_hf, save_weights  # noqa: E402

warnings.filterwarnings("ignore", message="torch.distributed is disabled")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def herd_to_hf(ckpt: str, out: str, dtype: str | None) -> None:
    model = export_to_hf(ckpt, out, dtype=_DTYPES[dtype] if dtype else None)
    kind = "Llama4ForConditionalGeneration" if model.args.vision.enabled else "Llama4ForCausalLM"
    print(f"wrote {out} ({kind}, {sum(p.numel() for p in model.parameters()) / 1e6:,.1f}M parameters)")


def hf_to_herd(hf_dir: str, out: str, dtype: str | None) -> None:
    model = from_hf(hf_dir, dtype=_DTYPES[dtype] if dtype else None)
    save_weights(model, out)
    print(f"wrote {out}: start training from it with checkpoint.load={out} "
          f"(model config: {model.args.dim} wide, "
          f"{model.args.n_layers} layers; model_args.json lists every field)")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("to-hf", help="herd checkpoint -> Hugging Face folder")
    a.add_argument("checkpoint")
    a.add_argument("out")
    a.add_argument("--dtype", choices=sorted(_DTYPES))
    b = sub.add_parser("from-hf", help="Hugging Face folder -> herd checkpoint")
    b.add_argument("hf_dir")
    b.add_argument("out")
    b.add_argument("--dtype", choices=sorted(_DTYPES))
    ns = p.parse_args(argv)
    try:
        if ns.cmd == "to-hf":
            herd_to_hf(ns.checkpoint, ns.out, ns.dtype)
        else:
            hf_to_herd(ns.hf_dir, ns.out, ns.dtype)
    except (FileNotFoundError, FileExistsError, ValueError) as e:  # CheckpointError is a ValueError
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
