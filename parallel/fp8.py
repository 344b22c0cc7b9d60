"""FP8 training: `parallel.fp8.recipe` x `parallel.fp8.backend`, applied to a model from outside.

What runs in FP8: the matmuls of the decoder blocks' dense linears (attention wq/wk/wv/wo, dense
FFN and shared expert w1/w2/w3) and of the routed experts, forward and backward. What stays in
high precision, as in DeepSeek-V3 (arXiv 2412.19437 §3.3): the router (a rounding error would
flip its top-k choice), embeddings, output head, norms, the attention core and the vision
encoder. Parameters, gradients and optimizer state keep their dtype: FP8 is a property of a
matmul, not of a weight, so state-dict names, checkpoints and exports are the same with FP8 on
or off, and a run may switch it on resume.

Backends (docs/fp8.md has the table of what runs where):
- native: autograd functions around torch._scaled_mm (dense) and torch._scaled_grouped_mm
  (experts, CUDA; a loop of torch._scaled_mm over the experts elsewhere). tensorwise | rowwise.
- torchao: torchao.float8's Float8Linear (tensorwise | rowwise) or MXFP8Linear (mxfp8, emulated
  off Blackwell); experts through torchao's grouped kernels where they exist (rowwise on CUDA,
  mxfp8), herd's native grouped matmul otherwise.
- te: Transformer Engine's te.Linear under fp8_autocast (CUDA only). tensorwise | blockwise | mxfp8.
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch
from torch import nn

from model.moe import GroupedExperts

log = logging.getLogger("herd")

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
RECIPES = ("none", "tensorwise", "rowwise", "blockwise", "mxfp8")
SUPPORTED = {"native": ("tensorwise", "rowwise"), "torchao": ("tensorwise", "rowwise", "mxfp8"),
             "te": ("tensorwise", "blockwise", "mxfp8")}
FP8_EXTRA = 'pip install "herd[fp8]"'


@dataclass
class Fp8Config:
    """The `parallel.fp8` config group."""

    recipe: str = "none"  # none | tensorwise | rowwise | blockwise | mxfp8
    backend: str = "native"  # native | torchao | te
    all_gather: bool = False  # FSDP all-gathers weights in FP8 (torchao + tensorwise on CUDA); false: param_dtype

    def validate(self) -> Fp8Config:
        """Raises ValueError naming the bad value and what would work."""
        if self.recipe not in RECIPES:
            raise ValueError(f"parallel.fp8.recipe={self.recipe!r} is not one of {', '.join(RECIPES)}")
        if self.backend not in SUPPORTED:
            raise ValueError(f"parallel.fp8.backend={self.backend!r} is not one of {', '.join(SUPPORTED)}")
        if self.recipe != "none" and self.recipe not in SUPPORTED[self.backend]:
            works = [b for b, recipes in SUPPORTED.items() if self.recipe in recipes]
            raise ValueError(
                f"parallel.fp8.recipe={self.recipe} does not run with parallel.fp8.backend={self.backend}, which runs "
                f"{' | '.join(SUPPORTED[self.backend])}; {self.recipe} runs with backend={' or '.join(works)}"
                + (" (torch._scaled_mm rejects block scales on CPU)" if self.recipe == "blockwise" else ""))
        if self.all_gather and (self.backend, self.recipe) != ("torchao", "tensorwise"):
            raise ValueError(f"parallel.fp8.all_gather=true needs backend=torchao and recipe=tensorwise (got "
                             f"{self.backend}, {self.recipe}); set parallel.fp8.all_gather=false")
        return self


# ---------------------------------------------------------------- quantisation


def quantize(x: torch.Tensor, dtype: torch.dtype, dim=None) -> tuple[torch.Tensor, torch.Tensor]:
    """x in FP8 with one scale per slice: amax over `dim` (an int or tuple, kept as size-1 dims;
    None: one scale for the whole tensor). Returns (x_fp8 in x's memory layout, the inverse scale
    in fp32), the pair torch._scaled_mm takes."""
    xf = x.float()
    amax = xf.abs().amax() if dim is None else xf.abs().amax(dim=dim, keepdim=True)
    fmax = torch.finfo(dtype).max
    scale = fmax / amax.clamp(min=1e-12)
    return (xf * scale).clamp(-fmax, fmax).to(dtype), scale.reciprocal()


def scaled_matmul(a: torch.Tensor, b: torch.Tensor, a_dtype: torch.dtype, rowwise: bool,
                  out_dtype: torch.dtype) -> torch.Tensor:
    """a [M, K] @ b [K, N] with both operands in FP8 (a in a_dtype, b in e4m3). rowwise: one scale
    per row of a and per column of b, the amax taken over the contracted K; tensorwise: one each.
    The kernel wants a row-major and b column-major, with K a multiple of 16 on CUDA."""
    if a.is_cuda and a.shape[1] % 16:  # zero padding of K changes neither amax nor product
        pad = 16 - a.shape[1] % 16
        a, b = torch.nn.functional.pad(a, (0, pad)), torch.nn.functional.pad(b, (0, 0, 0, pad))
    qa, sa = quantize(a, a_dtype, 1 if rowwise else None)
    qb, sb = quantize(b, E4M3, 0 if rowwise else None)
    return torch._scaled_mm(qa.contiguous(), qb.t().contiguous().t(), scale_a=sa, scale_b=sb, out_dtype=out_dtype)


class _Fp8Linear(torch.autograd.Function):
    """y = x w^T with the three matmuls of a linear in FP8: forward e4m3 x e4m3; backward the
    gradient times e4m3, the gradient in e5m2 under tensorwise scaling (one scale for a whole
    gradient needs e5m2's range) and in e4m3 under rowwise scaling, where each row's own scale
    supplies the range and e4m3's extra mantissa bit cuts the error by a third (torchao's rowwise
    recipe chose the same). The gradient is always the left operand, the side on which the CUDA
    rowwise kernel accepts e5m2."""

    @staticmethod
    def forward(ctx, x, w, rowwise: bool):
        ctx.save_for_backward(x, w)
        ctx.rowwise = rowwise
        y = scaled_matmul(x.reshape(-1, x.shape[-1]), w.t(), E4M3, rowwise, x.dtype)
        return y.view(*x.shape[:-1], w.shape[0])

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        g2 = g.reshape(-1, g.shape[-1])
        grad_dtype = E4M3 if ctx.rowwise else E5M2
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = scaled_matmul(g2, w, grad_dtype, ctx.rowwise, x.dtype).view(x.shape)
        if ctx.needs_input_grad[1]:
            dw = scaled_matmul(g2.t(), x.reshape(-1, x.shape[-1]), grad_dtype, ctx.rowwise, w.dtype)
        return dx, dw, None


class Fp8Linear(nn.Linear):
    """nn.Linear whose matmuls run in FP8 (native backend). Made by changing the class of an
    existing nn.Linear, so its parameters, their names and any hooks stay as they were."""

    fp8_recipe = "rowwise"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        with torch.autocast(device, enabled=False):  # the function picks its own dtypes
            y = _Fp8Linear.apply(x.to(dtype), self.weight.to(dtype), self.fp8_recipe == "rowwise")
        return y if self.bias is None else y + self.bias.to(dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, fp8={self.fp8_recipe}"


# ---------------------------------------------------------------- grouped (routed experts)


def padded_layout(counts: torch.Tensor, align: int, rows: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Rows grouped by counts, each group padded to a multiple of `align` rows (the FP8 grouped
    kernel's alignment): (where each row goes [rows], padded counts [E], padded row count). The
    count is an upper bound that needs no device-to-host sync; rows past the groups stay zero.
    With align 1 nothing moves: `where` is None."""
    if align == 1:
        return None, counts, rows
    padded = (counts + align - 1) // align * align
    shift = (torch.cumsum(padded, 0) - padded) - (torch.cumsum(counts, 0) - counts)
    dest = torch.arange(rows, device=counts.device) + torch.repeat_interleave(shift, counts, output_size=rows)
    return dest, padded, (rows + counts.numel() * (align - 1) + align - 1) // align * align


def _scatter_rows(x: torch.Tensor, dest: torch.Tensor | None, rows: int) -> torch.Tensor:
    return x if dest is None else x.new_zeros(rows, x.shape[1]).index_copy(0, dest, x)


def _gather_rows(x: torch.Tensor, dest: torch.Tensor | None) -> torch.Tensor:
    return x if dest is None else x[dest]


def _quantize_by_group(x: torch.Tensor, group: torch.Tensor, n_groups: int, per_column: bool):
    """x [M, C] (row i in group[i]) in e4m3 with one scale per group of rows, or per (group,
    column) when per_column: the amax over the group's rows. Returns (x_fp8, inverse scales
    [n_groups, C or 1])."""
    xf = x.float()
    a = xf.abs() if per_column else xf.abs().amax(1, keepdim=True)
    amax = xf.new_zeros(n_groups, a.shape[1]).scatter_reduce_(0, group[:, None].expand_as(a), a, "amax")
    fmax = torch.finfo(E4M3).max
    scale = fmax / amax.clamp(min=1e-12)
    return (xf * scale[group]).clamp(-fmax, fmax).to(E4M3), scale.reciprocal()


def _quantize_rows(x: torch.Tensor, group: torch.Tensor, n_groups: int, rowwise: bool):
    """The left operand of x @ w_e: per row (rowwise) or per expert's rows (tensorwise), as
    inverse scales per row [M, 1]."""
    if rowwise:
        return quantize(x, E4M3, 1)
    q, s = _quantize_by_group(x, group, n_groups, per_column=False)
    return q, s[group]


def _col_major(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-2) == 1 else t.transpose(-2, -1).contiguous().transpose(-2, -1)


def _grouped_scaled_mm(qa, sa, qb, sb, counts, out_dtype):
    """qa [M, K] (scales [M, 1]) times, group by group, qb [E, K, N] (scales [E, 1, N]) -> [M, N].
    The scaled kernels (and torch.compile's lowering of them) want a row-major, b column-major."""
    qa, qb, sa, sb = qa.contiguous(), _col_major(qb), sa.contiguous(), sb.contiguous()
    if qa.is_cuda:  # the grouped kernel: e4m3 only, bf16 out
        offs = torch.cumsum(counts, 0, dtype=torch.int32)
        return torch._scaled_grouped_mm(qa, qb, sa.flatten(), sb.flatten(1), offs=offs,
                                        out_dtype=torch.bfloat16).to(out_dtype)
    out = qa.new_zeros(qa.shape[0], qb.shape[-1], dtype=out_dtype)  # rows past the groups: padding
    start = 0
    for e, n in enumerate(counts.tolist()):
        if n:
            rows = slice(start, start + n)
            out[rows] = torch._scaled_mm(qa[rows], qb[e], scale_a=sa[rows], scale_b=sb[e], out_dtype=out_dtype)
        start += n
    return out


def _grouped_weight_grad(qx, sx, qg, sg, counts, out_dtype):
    """dW[e] = x_e^T g_e for qx [M, K], qg [M, N] with per-(group, column) scales -> [E, K, N]:
    the groups run along the contracted rows (a 2D x 2D grouped matmul)."""
    qxt, qg, sx, sg = qx.t().contiguous(), _col_major(qg), sx.contiguous(), sg.contiguous()
    if qx.is_cuda:
        offs = torch.cumsum(counts, 0, dtype=torch.int32)
        return torch._scaled_grouped_mm(qxt, qg, sx.flatten(), sg.flatten(), offs=offs,
                                        out_dtype=torch.bfloat16).to(out_dtype)
    out = qx.new_zeros(counts.numel(), qx.shape[1], qg.shape[1], dtype=out_dtype)
    start = 0
    for e, n in enumerate(counts.tolist()):
        if n:
            rows = slice(start, start + n)
            out[e] = torch._scaled_mm(qxt[:, rows], qg[rows], scale_a=sx[e, :, None], scale_b=sg[e, None],
                                      out_dtype=out_dtype)
        start += n
    return out


class _Fp8GroupedMM(torch.autograd.Function):
    """out[rows of e] = x[rows of e] @ w[e] for w [E, K, N], the three matmuls in e4m3 (the CUDA
    grouped kernel takes no e5m2). Each expert is a linear of its own, so no scale spans two
    experts: rowwise scales each row of x and g, each (expert, column) of w and, for the weight
    gradient, each (expert, column) of x and g; tensorwise has one scale per expert for each of
    w, its rows of x and its rows of g. Either way a rank's result for an expert depends only on
    that expert's rows, wherever expert parallelism computes them."""

    @staticmethod
    def forward(ctx, x, w, counts, rowwise: bool, align: int):
        E, _, N = w.shape
        dest, padded, rows = padded_layout(counts, align, x.shape[0])
        ends = torch.cumsum(padded, 0)
        group = torch.searchsorted(ends, torch.arange(rows, device=ends.device), right=True).clamp(max=E - 1)
        qx, sx = _quantize_rows(_scatter_rows(x, dest, rows), group, E, rowwise)
        qw, sw = quantize(w, E4M3, 1 if rowwise else (1, 2))
        y = _grouped_scaled_mm(qx, sx, qw, sw.expand(E, 1, N), padded, x.dtype)
        ctx.save_for_backward(x, w, dest, padded, group)
        ctx.rowwise, ctx.rows = rowwise, rows
        return _gather_rows(y, dest)

    @staticmethod
    def backward(ctx, g):
        x, w, dest, padded, group = ctx.saved_tensors
        rowwise, rows = ctx.rowwise, ctx.rows
        E, K, N = w.shape
        gp = _scatter_rows(g.contiguous(), dest, rows)
        dx = dw = None
        if ctx.needs_input_grad[0]:  # dx = g w_e^T: w_e^T scaled per (expert, k), over N
            qg, sg = _quantize_rows(gp, group, E, rowwise)
            qwt, swt = quantize(w.transpose(1, 2), E4M3, 1 if rowwise else (1, 2))
            dx = _gather_rows(_grouped_scaled_mm(qg, sg, qwt, swt.expand(E, 1, K), padded, x.dtype), dest)
        if ctx.needs_input_grad[1]:  # dw[e] = x_e^T g_e: contracted over the expert's rows
            qx, sx = _quantize_by_group(_scatter_rows(x, dest, rows), group, E, per_column=rowwise)
            qg, sg = _quantize_by_group(gp, group, E, per_column=rowwise)
            dw = _grouped_weight_grad(qx, sx.expand(E, K), qg, sg.expand(E, N), padded, w.dtype)
        return dx, dw, None, None, None


def fp8_grouped_mm(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor, *, recipe: str = "rowwise",
                   align: int | None = None) -> torch.Tensor:
    """`model.moe.grouped_mm` in FP8 (native). Groups are padded to `align` rows: 16 on CUDA,
    where the kernel needs it, none elsewhere."""
    align = align or (16 if x.is_cuda else 1)
    return _Fp8GroupedMM.apply(x, w, counts, recipe == "rowwise", align)


def torchao_grouped_mm(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor, *, recipe: str) -> torch.Tensor:
    """`model.moe.grouped_mm` through torchao's grouped kernels: MXFP8 (emulated off Blackwell,
    in bf16) or FP8 rowwise (CUDA). Both want groups padded (32 / 16 rows) and w column-major."""
    from torchao.quantization.quantize_.common import KernelPreference

    align = 32 if recipe == "mxfp8" else 16
    dest, padded, rows = padded_layout(counts, align, x.shape[0])
    offs = torch.cumsum(padded, 0, dtype=torch.int32)
    dtype = x.dtype if x.is_cuda else torch.bfloat16
    xp = _scatter_rows(x.to(dtype), dest, rows)
    wc = w.to(dtype).transpose(-2, -1).contiguous().transpose(-2, -1)
    if recipe == "mxfp8":
        from torchao.prototype.moe_training import _to_mxfp8_then_scaled_grouped_mm

        kernels = KernelPreference.AUTO if x.is_cuda else KernelPreference.EMULATED
        y = _to_mxfp8_then_scaled_grouped_mm(xp, wc, offs, out_dtype=dtype, kernel_preference=kernels)
    else:
        from torchao.prototype.moe_training import _to_fp8_rowwise_then_scaled_grouped_mm

        y = _to_fp8_rowwise_then_scaled_grouped_mm(xp, wc, offs, out_dtype=torch.bfloat16,
                                                   pad_token_groups_for_grouped_mm=False)
    return _gather_rows(y, dest).to(x.dtype)


# ---------------------------------------------------------------- applying a recipe


def fp8_linear_names(model: nn.Module) -> list[str]:
    """The linears FP8 applies to: every nn.Linear of the decoder blocks but the router, with
    both dims multiples of 16 (the FP8 kernels' alignment), so the same set runs on CPU and GPU."""
    return [name for name, m in model.named_modules()
            if type(m) is nn.Linear and name.startswith("layers.") and not name.endswith(".router")
            and m.in_features % 16 == 0 and m.out_features % 16 == 0]


def fp8_expert_names(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, GroupedExperts) and name.startswith("layers.")
            and m.w1.shape[1] % 16 == 0 and m.w1.shape[2] % 16 == 0]


def apply_fp8(model: nn.Module, fp8, device_type: str) -> list[str]:
    """Run `model`'s eligible linears and routed experts in FP8, in place; call before FSDP and
    torch.compile wrap the blocks. `fp8` has recipe, backend and all_gather (Fp8Config).
    Returns the names of the modules that now run in FP8."""
    cfg = Fp8Config(fp8.recipe, fp8.backend, fp8.all_gather).validate()
    if cfg.recipe == "none":
        return []
    linears, experts = fp8_linear_names(model), fp8_expert_names(model)
    if cfg.backend == "native":
        for name in linears:
            module = model.get_submodule(name)
            module.__class__, module.fp8_recipe = Fp8Linear, cfg.recipe
    elif cfg.backend == "torchao":
        _torchao_linears(model, linears, cfg, device_type)
    else:
        _te_linears(model, linears, cfg, device_type)
    matmul = functools.partial(fp8_grouped_mm, recipe=cfg.recipe)
    if cfg.backend == "torchao" and (cfg.recipe == "mxfp8" or (cfg.recipe == "rowwise" and device_type == "cuda")):
        matmul = functools.partial(torchao_grouped_mm, recipe=cfg.recipe)
    elif cfg.backend == "te":  # te.GroupedLinear would rename the expert weights (weight0..): native rowwise
        matmul = functools.partial(fp8_grouped_mm, recipe="rowwise")
    for name in experts:
        model.get_submodule(name).grouped_mm = matmul
    log.info(f"fp8: {cfg.recipe} ({cfg.backend}) on {len(linears)} linears and {len(experts)} routed-expert "
             f"groups ({getattr(matmul.func, '__name__', matmul)}); router, embeddings, output, norms, attention "
             f"core and vision stay in high precision")
    return linears + experts


def _require(module: str, why: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ValueError(f"{why}, which is not installed ({e}): {FP8_EXTRA}") from None


def _torchao_linears(model: nn.Module, names: list[str], cfg: Fp8Config, device_type: str) -> None:
    if cfg.all_gather and device_type != "cuda":
        raise ValueError("parallel.fp8.all_gather=true needs CUDA and NCCL (gloo cannot all-gather FP8: "
                         "'Invalid scalar type'); set parallel.fp8.all_gather=false")
    ao = _require("torchao.float8", "parallel.fp8.backend=torchao needs torchao (pip install torchao==0.18.0)")
    if cfg.recipe == "mxfp8":
        from torchao.prototype.moe_training.mxfp8_linear import MXFP8Linear
        from torchao.quantization.quantize_.common import KernelPreference

        kernels = KernelPreference.AUTO if device_type == "cuda" else KernelPreference.EMULATED
        for name in names:
            old = model.get_submodule(name)
            with torch.device("meta"):  # the weight is the old one; nothing to allocate
                new = MXFP8Linear(old.in_features, old.out_features, bias=False, kernel_preference=kernels)
            new.weight = old.weight
            _set_submodule(model, name, new)
        return
    config = ao.Float8LinearConfig.from_recipe_name(cfg.recipe)
    if cfg.all_gather:
        import dataclasses

        config = dataclasses.replace(config, enable_fsdp_float8_all_gather=True)
    chosen = set(names)
    ao.convert_to_float8_training(model, config=config, module_filter_fn=lambda _m, fqn: fqn in chosen)


def _te_linears(model: nn.Module, names: list[str], cfg: Fp8Config, device_type: str) -> None:
    """te.Linear in place of each linear, its forward inside fp8_autocast. Not run by herd's tests
    (no CUDA there): written against Transformer Engine 2.x's API."""
    if device_type != "cuda":
        raise ValueError(f"parallel.fp8.backend=te needs CUDA: Transformer Engine has no kernels for "
                         f"{device_type}; use parallel.fp8.backend=native or torchao")
    te = _require("transformer_engine.pytorch", "parallel.fp8.backend=te needs Transformer Engine")
    recipes = _require("transformer_engine.common.recipe", "parallel.fp8.backend=te needs Transformer Engine")
    recipe = {"tensorwise": recipes.Float8CurrentScaling, "blockwise": recipes.Float8BlockScaling,
              "mxfp8": recipes.MXFP8BlockScaling}[cfg.recipe]()

    class TeLinear(te.Linear):
        # Current and block scaling keep no amax history, so the module needs no extra state;
        # nn.Module's defaults keep `_extra_state` out of the state dict, whose names stay herd's.
        get_extra_state, set_extra_state = nn.Module.get_extra_state, nn.Module.set_extra_state

        def forward(self, x):
            with te.fp8_autocast(enabled=True, fp8_recipe=recipe):
                return super().forward(x)

    for name in names:
        old = model.get_submodule(name)
        new = TeLinear(old.in_features, old.out_features, bias=False, params_dtype=old.weight.dtype,
                       device="meta" if old.weight.is_meta else old.weight.device)
        new.weight = old.weight
        _set_submodule(model, name, new)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)
