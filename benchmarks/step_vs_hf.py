"""One training step (forward + backward) of herd against transformers' Llama4ForCausalLM on the
same config, weights and tokens, in one process, alternating, median of several runs.

    python benchmarks/step_vs_hf.py [--experts 16] [--dim 512] [--seq 1024] [--device cpu|cuda]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from model.hf import args_from_hf_config, from_hf  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def step_time(fn, device) -> float:
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--top-k", type=int, default=1)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--expert-hidden", type=int, default=1024)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--vocab", type=int, default=4352)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args()
    device = torch.device(a.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    from transformers import Llama4ForCausalLM, Llama4TextConfig

    cfg = Llama4TextConfig(
        vocab_size=a.vocab, hidden_size=a.dim, num_hidden_layers=a.layers, num_attention_heads=a.dim // 64,
        num_key_value_heads=max(1, a.dim // 256), head_dim=64, intermediate_size=a.expert_hidden,
        intermediate_size_mlp=2 * a.expert_hidden, num_local_experts=a.experts, num_experts_per_tok=a.top_k,
        interleave_moe_layer_step=1, attention_chunk_size=a.seq // 2, max_position_embeddings=4 * a.seq,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
    )
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    hf = Llama4ForCausalLM(cfg).to(device=device, dtype=dtype).train()
    herd = from_hf({k: v.clone() for k, v in hf.state_dict().items()}, args_from_hf_config(cfg.to_dict())).train()
    tokens = torch.randint(0, a.vocab, (a.batch, a.seq + 1), device=device)
    inputs, labels = tokens[:, :-1], tokens[:, 1:]

    def loss_of(logits):
        return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())

    def step_hf():
        loss_of(hf(inputs).logits).backward()
        hf.zero_grad(set_to_none=True)

    def step_herd():
        loss_of(herd(inputs)).backward()
        herd.zero_grad(set_to_none=True)

    with torch.no_grad():
        diff = (herd(inputs).float() - hf(inputs).logits.float()).abs().max().item()
    for fn in (step_hf, step_herd):  # warm up
        fn()
    times = {"transformers": [], "herd": []}
    for _ in range(a.repeats):
        times["transformers"].append(step_time(step_hf, device))
        times["herd"].append(step_time(step_herd, device))
    med = {k: statistics.median(v) for k, v in times.items()}
    tok = a.batch * a.seq
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), {dtype}, "
          f"torch {torch.__version__}; {a.layers} MoE layers, dim {a.dim}, {a.experts} experts top-{a.top_k}, "
          f"expert hidden {a.expert_hidden}, {a.batch}x{a.seq} tokens; max |logit diff| {diff:.2e}")
    print(f"{'':<14}{'step (ms)':>12}{'tokens/s':>12}")
    for k in ("transformers", "herd"):
        print(f"{k:<14}{med[k] * 1e3:>12.1f}{tok / med[k]:>12,.0f}")
    print(f"herd speed-up: {med['transformers'] / med['herd']:.2f}x")


if __name__ == "__main__":
    main()
