"""FP8 (parallel/fp8.py): each FP8 path against fp32 on N(0,1) data (output SQNR >= 24 dB, input
and weight gradients >= 20 dB, and an error at least 5x bf16's, so FP8 really ran); which modules
it touches and that the state dict keeps its names; the config's errors; FSDP2 and expert
parallelism on 2 gloo ranks with FP8 equal one process."""
import copy
import functools
import importlib.util

import pytest
import torch
from torch import nn

from model.moe import GroupedExperts, grouped_mm
from parallel.fp8 import Fp8Config, Fp8Linear, apply_fp8, fp8_grouped_mm, padded_layout
from tests.helpers import compose, run_ranks

HAS_TORCHAO = importlib.util.find_spec("torchao") is not None
needs_torchao = pytest.mark.skipif(not HAS_TORCHAO, reason="torchao is not installed (pip install torchao==0.18.0)")
TORCHAO = [pytest.param("torchao", r, marks=needs_torchao) for r in ("tensorwise", "rowwise", "mxfp8")]


def sqnr(ref: torch.Tensor, x: torch.Tensor) -> float:
    return (10 * torch.log10(ref.pow(2).sum() / (ref - x.float()).pow(2).sum())).item()


def rel_error(ref: torch.Tensor, x: torch.Tensor) -> float:
    return ((ref - x.float()).norm() / ref.norm()).item()


def in_a_block(module: nn.Module) -> nn.Module:
    """apply_fp8 converts what lives in a model's decoder blocks (`layers.*`)."""
    model = nn.Module()
    model.layers = nn.ModuleDict({"0": module})
    return model


def check_against_fp32(ref, bf16, fp8, what):
    """Output, input gradient, weight gradient: FP8 close enough to fp32, and measurably further
    from it than bf16 is."""
    for name, r, b, f, floor in zip(("output", "grad input", "grad weight"), ref, bf16, fp8, (24, 20, 20)):
        assert sqnr(r, f) >= floor, (what, name, sqnr(r, f))
        assert rel_error(r, f) >= 5 * rel_error(r, b), (what, name, rel_error(r, f), rel_error(r, b))


def run_linear(linear, x, g, dtype=torch.float32):
    linear = linear.to(dtype)
    x = x.to(dtype).detach().requires_grad_()
    y = linear(x)
    y.backward(g.to(dtype))
    return y.detach().float(), x.grad.float(), linear.weight.grad.float()


@pytest.mark.parametrize("backend,recipe", [("native", "tensorwise"), ("native", "rowwise"), *TORCHAO])
def test_linear_in_fp8_against_fp32(backend, recipe):
    torch.manual_seed(0)
    x, g = torch.randn(256, 256), torch.randn(256, 512)
    linear = nn.Linear(256, 512, bias=False)
    nn.init.normal_(linear.weight)
    ref = run_linear(copy.deepcopy(linear), x, g)
    bf16 = run_linear(copy.deepcopy(linear), x, g, torch.bfloat16)
    model = in_a_block(linear)
    assert apply_fp8(model, Fp8Config(recipe, backend), "cpu") == ["layers.0"]
    assert type(model.layers["0"]) is not nn.Linear
    check_against_fp32(ref, bf16, run_linear(model.layers["0"], x, g), f"{backend} {recipe}")


COUNTS = torch.tensor([0, 37, 5, 100, 1, 0, 60, 53])  # empty groups, groups of 1, none a multiple of 16


def run_grouped(matmul, x, w, g):
    x, w = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    y = matmul(x, w, COUNTS)
    y.backward(g.to(y.dtype))
    return y.detach().float(), x.grad.float(), w.grad.float()


@pytest.mark.parametrize("backend,recipe,align", [("native", "tensorwise", 1), ("native", "rowwise", 1),
                                                  ("native", "rowwise", 16),
                                                  pytest.param("torchao", "mxfp8", 32, marks=needs_torchao)])
def test_grouped_experts_in_fp8_against_fp32(backend, recipe, align):
    """One grouped matmul (x [M, K] grouped by expert, w [E, K, N]) as the experts run it; align:
    the rows each group is padded to (16 is what the CUDA kernel needs; torchao pads mxfp8 to 32)."""
    torch.manual_seed(0)
    x, w, g = torch.randn(int(COUNTS.sum()), 128), torch.randn(8, 128, 192), torch.randn(int(COUNTS.sum()), 192)
    ref = run_grouped(grouped_mm, x, w, g)
    bf16 = run_grouped(grouped_mm, x.bfloat16(), w.bfloat16(), g)
    model = in_a_block(GroupedExperts(8, 128, 192))
    assert apply_fp8(model, Fp8Config(recipe, backend), "cpu") == ["layers.0"]
    matmul = model.layers["0"].grouped_mm
    assert matmul is not grouped_mm
    if backend == "native":
        matmul = functools.partial(matmul, align=align)
    check_against_fp32(ref, bf16, run_grouped(matmul, x, w, g), f"{backend} {recipe} align {align}")


def test_padding_groups_to_16_rows_changes_nothing():
    dest, padded, rows = padded_layout(COUNTS, 16, int(COUNTS.sum()))
    assert padded.tolist() == [0, 48, 16, 112, 16, 0, 64, 64] and rows >= int(padded.sum()) and rows % 16 == 0
    starts = (torch.cumsum(padded, 0) - padded).tolist()
    assert dest[:37].tolist() == list(range(starts[1], starts[1] + 37))  # expert 1's rows open its padded group
    assert dest[37:42].tolist() == list(range(starts[2], starts[2] + 5))
    torch.manual_seed(0)
    x, w, g = torch.randn(int(COUNTS.sum()), 128), torch.randn(8, 128, 192), torch.randn(int(COUNTS.sum()), 192)
    for recipe in ("tensorwise", "rowwise"):
        plain = run_grouped(functools.partial(fp8_grouped_mm, recipe=recipe, align=1), x, w, g)
        padded_run = run_grouped(functools.partial(fp8_grouped_mm, recipe=recipe, align=16), x, w, g)
        for a, b in zip(plain, padded_run):
            torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-5)


def tiny_model():
    from model import Transformer
    from train.config import model_args

    torch.manual_seed(0)
    model = Transformer(model_args(compose(["+model=tiny"])))
    model.init_weights()
    return model


@pytest.mark.parametrize("backend,recipe", [("native", "rowwise"), *TORCHAO[1:]])
def test_what_runs_in_fp8_and_what_stays_high_precision(backend, recipe):
    model = tiny_model()
    names = list(model.state_dict())
    tokens = torch.randint(0, model.args.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    ref = model(tokens)
    converted = apply_fp8(model, Fp8Config(recipe, backend), "cpu")
    assert list(model.state_dict()) == names  # checkpoints and HF export see the same model
    # attention q/k/v/o on 4 layers, dense FFN on 2, shared expert on 2; experts on 2 MoE layers
    assert len(converted) == 4 * 4 + 2 * 3 + 2 * 3 + 2
    assert "layers.1.feed_forward.experts" in converted and "layers.1.feed_forward.shared_expert.w2" in converted
    assert all(".router" not in n and not n.startswith(("vision", "output", "tok_embeddings")) for n in converted)
    assert type(model.layers["1"].feed_forward.router) is nn.Linear and type(model.output) is nn.Linear
    assert all(type(m) is nn.Linear for m in model.vision.modules() if isinstance(m, nn.Linear))
    if backend == "native":
        assert type(model.layers["0"].attention.wq) is Fp8Linear
    logits = model(tokens)
    # FP8 ran, and the model still computes the same function: ~3% per matmul, ~5% after 4 layers
    assert 0 < rel_error(ref, logits) < 0.1
    logits.float().square().mean().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if n.startswith("layers."))


def test_config_errors_name_the_value_and_what_works():
    from train.config import validate

    with pytest.raises(ValueError, match="parallel.fp8.recipe='fp4' is not one of none, tensorwise"):
        validate(compose(["+model=tiny", "parallel.fp8.recipe=fp4"]))
    with pytest.raises(ValueError, match=r"backend=native, which runs tensorwise \| rowwise; blockwise runs with "
                                         r"backend=te \(torch._scaled_mm rejects block scales on CPU\)"):
        validate(compose(["+model=tiny", "parallel.fp8.recipe=blockwise"]))
    with pytest.raises(ValueError, match="mxfp8 runs with backend=torchao or te"):
        Fp8Config("mxfp8", "native").validate()
    with pytest.raises(ValueError, match="rowwise does not run with parallel.fp8.backend=te"):
        Fp8Config("rowwise", "te").validate()
    with pytest.raises(ValueError, match="all_gather=true needs backend=torchao and recipe=tensorwise"):
        Fp8Config("rowwise", "native", all_gather=True).validate()
    with pytest.raises(ValueError, match="parallel.fp8.backend=te needs CUDA"):
        apply_fp8(tiny_model(), Fp8Config("tensorwise", "te"), "cpu")
    assert apply_fp8(tiny_model(), Fp8Config(), "cpu") == []  # recipe none: nothing changes


@pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("transformer_engine") is None,
                    reason="Transformer Engine runs on CUDA only, and needs pip install \"herd[fp8]\"")
def test_transformer_engine_linear_against_fp32():
    torch.manual_seed(0)
    x, g = torch.randn(256, 256, device="cuda"), torch.randn(256, 512, device="cuda")
    linear = nn.Linear(256, 512, bias=False, device="cuda")
    nn.init.normal_(linear.weight)
    ref = run_linear(copy.deepcopy(linear), x, g)
    bf16 = run_linear(copy.deepcopy(linear), x, g, torch.bfloat16)
    model = in_a_block(linear)
    names = list(model.state_dict())
    apply_fp8(model, Fp8Config("tensorwise", "te"), "cuda")
    assert list(model.state_dict()) == names
    check_against_fp32(ref, bf16, run_linear(model.layers["0"], x, g), "te tensorwise")


# ---------------------------------------------------------------- 2 gloo ranks

TEXT = ["+model=tiny", "model.vision.enabled=false", "model.router_aux_loss_coef=0"]


def _train_steps(recipe: str, ep: int, steps: int = 2):
    """`steps` AdamW steps of the tiny text model with native FP8 under FSDP2 (and EP) on this
    rank, or in one process when it is alone. Every rank trains on the same batch: FP8 scales are
    amaxes over what a rank holds, so with different data per rank the layouts would differ by
    FP8 rounding, which would hide a real mismatch; with the same data they must agree to float
    rounding."""
    import torch.nn.functional as F

    from parallel import build_mesh, init_distributed, parallelize_model
    from train.build import build_model
    from train.config import model_args

    args = model_args(compose(TEXT))
    model = build_model(args, seed=0)
    meshes = build_mesh(init_distributed("cpu"), -1, 1, ep, args.n_experts)
    model = parallelize_model(model, meshes, fp8=Fp8Config(recipe, "native"), device_type="cpu")
    assert sum(isinstance(m, Fp8Linear) for m in model.modules()) == 4 * 4 + 2 * 3 + 2 * 3
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    tokens = torch.randint(0, args.vocab_size, (2, 65), generator=torch.Generator().manual_seed(1))
    losses, grads = [], None
    for _ in range(steps):
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
        loss.backward()
        grads = grads or {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
                          for n, p in model.named_parameters()}  # the first step's, full size
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, grads


RECIPES = ("tensorwise", "rowwise")


def _layouts(world_size):
    if world_size == 1:
        return {r: _train_steps(r, ep=1) for r in RECIPES}
    return {(r, ep): _train_steps(r, ep) for r in RECIPES for ep in (1, 2)}


def test_fsdp_and_ep_with_fp8_equal_one_process():
    """FSDP2 all-gathers the weights in fp32 and FP8 quantises the full weight (tensorwise would
    notice a shard's amax); ep=2 computes each expert's rows on its owner, padding and all."""
    (one,) = run_ranks(_layouts, 1, 1)  # forked like the ranks: one thread, the same float sums
    r0, r1 = run_ranks(_layouts, 2, 2)
    for recipe in RECIPES:
        losses, grads = one[recipe]
        assert losses[-1] < losses[0], recipe  # it learns, so the comparison means something
        assert r0[recipe, 1][0] == r1[recipe, 1][0] and r0[recipe, 2][0] == r1[recipe, 2][0]
        # Two ranks holding the same batch average identical gradients: bitwise one process.
        assert r0[recipe, 1][0] == losses, recipe
        for name, g in grads.items():
            torch.testing.assert_close(r0[recipe, 1][1][name], g, rtol=0, atol=0, msg=f"{recipe} {name}")
        # EP: an expert's owner gets both ranks' (identical) rows: the same amaxes and FP8 values,
        # and twice the rows in the weight gradient's sum, which rounds differently from one
        # process at ~1e-7 (Adam and FP8 rounding amplify that over later steps, to ~1e-4 by the
        # third, still 100x below what FP8 itself moves the loss by then).
        for name, g in grads.items():
            torch.testing.assert_close(r0[recipe, 2][1][name], g, rtol=1e-5, atol=1e-7, msg=f"{recipe} {name}")
        assert r0[recipe, 2][0] == pytest.approx(losses, rel=1e-6), recipe
