"""Triton RMSNorm, with an optional fused residual add (backends of `rms_norm` and `fused_add_rms_norm`).

One program per row: the row is read once, its sum of squares reduced in float32, and the result
written once; with a residual, the sum x + residual is also written, so the add costs no extra pass.
Rounding follows the reference step by step (the sum and the normalized row are rounded to x's
dtype where the model rounds them), so in float32 the result equals the reference up to the order
of the reduction. The skinny GEMM's NORM prologue (`add_rms_norm_linear`) must give the same numbers, so
the add, the inverse RMS and the weighting are @triton.jit helpers both call. Imported lazily: `triton.jit`
fixes interpreter vs compiled mode when it decorates.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .quant_act import empty_quantized, kernel_groups
from .quant_format import FP8_DTYPE
from .triton_fp8 import store_tile_quantized
from .triton_layout import as_rows, merged_stride
from .triton_pdl import pdl_launch, wait_for_inputs


@triton.jit
def rounded_sum(x, residual):
    """x + residual, added in float32 and rounded to x's dtype as the model's add rounds it."""
    return (x.to(tl.float32) + residual.to(tl.float32)).to(x.dtype)


@triton.jit
def inverse_rms(sum_of_squares, n_cols, eps):
    """1 / sqrt(mean square + eps) of a row, as the model computes it (torch.rsqrt)."""
    return tl.rsqrt(sum_of_squares / n_cols + eps)


@triton.jit
def weighted_normed(x, rstd, weight, ROUND_NORMED: tl.constexpr):
    """weight * (x * rstd) in float32, the normalized x rounded to x's dtype first where the model rounds it
    (ROUND_NORMED, Llama: weight * normed.to(x.dtype)); the caller rounds the product to its output dtype."""
    normed = x.to(tl.float32) * rstd
    if ROUND_NORMED:
        normed = normed.to(x.dtype).to(tl.float32)
    return weight.to(tl.float32) * normed


def rounds_normed(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """The ROUND_NORMED constexpr: whether the model rounds the normalized row to x's dtype before the weight
    (a weight in x's dtype, Llama) or multiplies in float32 (a float32 weight expression, Gemma's 1 + w)."""
    return torch.promote_types(x.dtype, weight.dtype) == x.dtype


@triton.jit
def _rms_norm_kernel(
    x_ptr, residual_ptr, weight_ptr, out_ptr, sum_out_ptr, scale_ptr,
    stride_x, stride_r, stride_o, stride_s, stride_scale_m, stride_scale_g, n_cols, eps, heads, stride_xh,
    HAS_RESIDUAL: tl.constexpr, ROUND_NORMED: tl.constexpr, BLOCK: tl.constexpr,
    QUANT_FP8: tl.constexpr = False, GROUP: tl.constexpr = 1, NUM_GROUPS: tl.constexpr = 1,
    INTERPRET: tl.constexpr = False, USE_PDL: tl.constexpr = False, static_ptr=None, STATIC: tl.constexpr = False,
):
    wait_for_inputs(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    # the row as a [BLOCK // GROUP, GROUP] tile from the start (one group per tile row when quantizing per
    # group, else one tile row): per-group amaxes need no reshape, which costs a trip through shared memory
    cols = tl.arange(0, BLOCK // GROUP)[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
    valid = cols < n_cols
    # x's row: (row // heads, row % heads) of x viewed as [rows / heads, heads, n_cols] (heads 1: plain rows)
    x = tl.load(x_ptr + (row // heads) * stride_x + (row % heads) * stride_xh + cols, mask=valid, other=0.0)
    if HAS_RESIDUAL:
        x = rounded_sum(x, tl.load(residual_ptr + row * stride_r + cols, mask=valid, other=0.0))
        tl.store(sum_out_ptr + row * stride_s + cols, x, mask=valid)
    xf = x.to(tl.float32)
    rstd = inverse_rms(tl.sum(tl.sum(xf * xf, axis=1), axis=0), n_cols, eps)
    weight = tl.load(weight_ptr + cols, mask=valid, other=0.0)
    y = weighted_normed(x, rstd, weight, ROUND_NORMED)
    if QUANT_FP8:  # the row as the unfused graph hands it on (x's dtype), quantized per group of GROUP columns
        groups = tl.arange(0, BLOCK // GROUP)
        store_tile_quantized(y.to(x.dtype).to(tl.float32), out_ptr + row * stride_o + cols, valid,
                             scale_ptr + row * stride_scale_m + groups * stride_scale_g, groups < NUM_GROUPS, INTERPRET,
                             static_ptr, STATIC)
    else:
        tl.store(out_ptr + row * stride_o + cols, y.to(out_ptr.dtype.element_ty), mask=valid)


def _head_rows(x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """(x's rows as a [rows / heads, n] view strided by its outer rows, heads, the stride between heads): the
    per-head q / k norms of Qwen3, Gemma 3 or OLMo 2 read [..., heads, head_dim] slices of a fused qkv output,
    whose rows no single stride reaches; they are read in place instead of through a copy kernel (as_rows
    would copy). Rows one stride reaches stay plain rows (heads 1)."""
    if x.dim() >= 3 and x.stride(-1) == 1 and merged_stride(x, x.dim() - 1) is None \
            and merged_stride(x, x.dim() - 2) is not None:
        return x.select(-2, 0).reshape(-1, x.shape[-1]), x.shape[-2], x.stride(-2)
    return as_rows(x), 1, 0


def _launch(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
            scale: torch.Tensor | None = None, group_size: int = -1, input_scale: torch.Tensor | None = None):
    """(normed, x + residual); without a residual the second result is the first (nothing to add).
    With `scale` (float32 [..., G]) normed comes out as e4m3, quantized per row (G = 1) or per group of
    group_size columns (a power of two), or with the static `input_scale`, its scales in `scale`."""
    x2, heads, stride_xh = _head_rows(x) if residual is None else (as_rows(x), 1, 0)
    out = torch.empty(x.shape, dtype=x.dtype if scale is None else FP8_DTYPE, device=x.device)
    out2 = out.view(-1, x.shape[-1])
    residual2 = as_rows(residual) if residual is not None else x2
    added = torch.empty(x.shape, dtype=x.dtype, device=x.device) if residual is not None else out
    added2 = added.view(-1, x.shape[-1])
    n_rows, n_cols = out2.shape
    if n_rows == 0:
        return out, added
    block = triton.next_power_of_2(n_cols)
    groups = 1 if scale is None else scale.shape[-1]
    scale2 = scale.view(n_rows, groups) if scale is not None else weight.view(1, -1)
    _rms_norm_kernel[(n_rows,)](
        x2, residual2, weight.contiguous(), out2, added2, scale2,
        x2.stride(0), residual2.stride(0), out2.stride(0), added2.stride(0), *scale2.stride(), n_cols, eps, heads,
        stride_xh, HAS_RESIDUAL=residual is not None,
        ROUND_NORMED=rounds_normed(x, weight),
        BLOCK=block, QUANT_FP8=scale is not None, GROUP=block if groups == 1 else group_size, NUM_GROUPS=groups,
        INTERPRET=not x.is_cuda, static_ptr=input_scale, STATIC=input_scale is not None,
        num_warps=min(max(block // 512, 1), 8), **pdl_launch(x.device),
    )
    return out, added


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Same contract as `torch.ops.autodeploy.rms_norm`."""
    return _launch(x, None, weight, eps)[0]


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as `torch.ops.autodeploy.fused_add_rms_norm`: (normed, x + residual)."""
    return _launch(x, residual, weight, eps)


def fused_add_rms_norm_quant_fp8(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, group_size: int = -1,
    input_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Same contract as `torch.ops.autodeploy.fused_add_rms_norm_quant_fp8`: (e4m3 normed, scale, x + residual).
    Group sizes the kernels do not take (quant_act.kernel_groups) go to the reference."""
    if not kernel_groups(group_size, x.shape[-1]):
        return torch.ops.autodeploy.fused_add_rms_norm_quant_fp8(x, residual, weight, eps, group_size, input_scale)
    scale = empty_quantized(x, group_size)[1]
    q, added = _launch(x, residual, weight, eps, scale, group_size, input_scale)
    return q, scale, added
