"""FP8 activations quantized where they are produced: the ops `fuse_fp8_act_quant` splits W8A8 linears into.

`fp8_linear` with per-token dynamic scales quantizes its input itself. On a GPU that is either work repeated
by every program of the GEMM (each finds the rows' amax, then scales every tile) or a kernel of its own
before each GEMM; both cost more at decode than the e4m3 GEMM reading activations already quantized. So the
graph quantizes once per activation tensor, and where the producer is the residual add + RMSNorm, that
kernel writes e4m3 and the scales instead of the normalized row:
- `quantize_fp8_per_token(x, group_size=-1, input_scale=None) -> (q, scale)`: q = x / scale saturated to e4m3,
  scale = amax(|row|) / 448 ([..., 1], float32), or with a group size one scale per group of that many columns
  ([..., G], the last group short where the size does not divide K: `act_quant="group"`), or a static
  input_scale (an FP8 checkpoint's) repeated per row, exactly as `fp8_linear`'s reference quantizes. Every op
  here stores its scales group-major (`empty_scales`).
- `fp8_linear_quantized_input(q, scale, weight, weight_scale, bias, out_dtype, group_size=-1)`: the rest of
  `fp8_linear` (group_size: the columns per scale the quantization used).
- `fused_add_rms_norm_quant_fp8(x, residual, weight, eps, group_size=-1, input_scale=None) -> (q, scale,
  x + residual)`: the normalized row rounded to x's dtype (as the unfused graph hands it on), then quantized.
- `gated_act_quant_fp8(gate, up, activation, group_size=-1, input_scale=None) -> (q, scale)`: a gated MLP's
  act(gate) * up,
  quantized for the down projection in the same kernel.
Composed, they give `fp8_linear`'s reference results bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .fused_add_rms_norm import fused_add_rms_norm
from .gated_act import gated_act
from .quant_linear import (activation_groups, activation_scale, check_weight_blocks, quantize_activation,
                           scaled_fp8_matmul)


def empty_scales(rows_shape: Sequence[int], groups: int, device: torch.device) -> torch.Tensor:
    """Empty float32 scales [*rows_shape, G] stored group-major: one group's scales of every row side by side (stride
    1 along the rows), the layout cuBLASLt's 1 x 128 block-scaled GEMM reads; stored row-major, each such GEMM paid a
    transposing copy kernel (H200, batch 64: ~1.8 us, three per Llama layer). One scale per row: the same layout."""
    return torch.empty(groups, *rows_shape, dtype=torch.float32, device=device).movedim(0, -1)


def group_major(scale: torch.Tensor) -> torch.Tensor:
    """scale [..., G] in the layout of `empty_scales` (the references' results, laid out as the kernels' are)."""
    return empty_scales(scale.shape[:-1], scale.shape[-1], scale.device).copy_(scale)


def empty_quantized(x: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Empty (e4m3 q, float32 scale [..., G], group-major: `empty_scales`) for x: the fake impls' and the Triton
    backends' outputs."""
    groups = activation_groups(x.shape[-1], group_size)
    return (torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device),
            empty_scales(x.shape[:-1], groups, x.device))


def kernel_groups(group_size: int, k: int) -> bool:
    """Whether the Triton kernels take these activation groups: one per row, or a power of two >= 16 columns
    (tiles of K divide it). Others are the references' job."""
    return activation_groups(k, group_size) == 1 or (group_size >= 16 and not group_size & (group_size - 1))


@torch.library.custom_op("autodeploy::quantize_fp8_per_token", mutates_args=(),
                         schema="(Tensor x, int group_size=-1, Tensor? input_scale=None) -> (Tensor, Tensor)")
def quantize_fp8_per_token(x: torch.Tensor, group_size: int = -1,
                           input_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: (e4m3 x / scale, float32 scale [..., G]) with scale = amax of each row (or each group of
    group_size columns of it) / 448, or the static input_scale (one value; group_size -1) repeated per row."""
    if input_scale is not None:
        scale = input_scale.float().reshape(()).expand(*x.shape[:-1], 1)
        return quantize_activation(x, scale), group_major(scale)
    scale = activation_scale(x, None, "token" if group_size == -1 else "group", group_size)
    return quantize_activation(x, scale, group_size), group_major(scale)


@quantize_fp8_per_token.register_fake
def _(x, group_size=-1, input_scale=None):
    return empty_quantized(x, group_size)


@torch.library.custom_op(
    "autodeploy::fp8_linear_quantized_input", mutates_args=(),
    schema="(Tensor q, Tensor scale, Tensor weight, Tensor weight_scale, Tensor? bias, ScalarType out_dtype, "
           "int group_size=-1) -> Tensor",
)
def fp8_linear_quantized_input(q: torch.Tensor, scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                               bias: torch.Tensor | None, out_dtype: torch.dtype, group_size: int = -1) -> torch.Tensor:
    """Reference: float32 (q @ w.T) * scale * weight_scale (+ bias), in out_dtype (fp8_linear's arithmetic)."""
    k = q.shape[-1]
    y = scaled_fp8_matmul(q.reshape(-1, k), scale.reshape(-1, scale.shape[-1]), weight, weight_scale, bias, group_size)
    return y.to(out_dtype).reshape(*q.shape[:-1], weight.shape[0])


@fp8_linear_quantized_input.register_fake
def _(q, scale, weight, weight_scale, bias, out_dtype, group_size=-1):
    torch._check(weight.dim() == 2 and weight.shape[1] == q.shape[-1], lambda: "weight must be [N, K]")
    groups = activation_groups(q.shape[-1], group_size)
    torch._check(scale.shape[-1] == groups, lambda: f"scale must have {groups} columns (group size {group_size})")
    check_weight_blocks(weight, weight_scale, group_size)
    return q.new_empty(*q.shape[:-1], weight.shape[0], dtype=out_dtype)


@torch.library.custom_op(
    "autodeploy::fused_add_rms_norm_quant_fp8", mutates_args=(),
    schema="(Tensor x, Tensor residual, Tensor weight, float eps, int group_size=-1, Tensor? input_scale=None) "
           "-> (Tensor, Tensor, Tensor)",
)
def fused_add_rms_norm_quant_fp8(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                                 group_size: int = -1, input_scale: torch.Tensor | None = None
                                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference: fused_add_rms_norm, then the normalized row quantized per token (or per token and group, or
    with the static input_scale)."""
    normed, added = fused_add_rms_norm(x, residual, weight, eps)
    q, scale = quantize_fp8_per_token(normed, group_size, input_scale)
    return q, scale, added


@fused_add_rms_norm_quant_fp8.register_fake
def _(x, residual, weight, eps, group_size=-1, input_scale=None):
    torch._check(x.shape == residual.shape, lambda: "x and residual must have the same shape")
    return (*empty_quantized(x, group_size), torch.empty_like(x))


@torch.library.custom_op(
    "autodeploy::gated_act_quant_fp8", mutates_args=(),
    schema="(Tensor gate, Tensor up, str activation, int group_size=-1, Tensor? input_scale=None) -> (Tensor, Tensor)")
def gated_act_quant_fp8(gate: torch.Tensor, up: torch.Tensor, activation: str, group_size: int = -1,
                        input_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: gated_act, then quantized per token (or per token and group, or with the static input_scale)."""
    return quantize_fp8_per_token(gated_act(gate, up, activation), group_size, input_scale)


@gated_act_quant_fp8.register_fake
def _(gate, up, activation, group_size=-1, input_scale=None):
    return empty_quantized(gate.new_empty(torch.broadcast_shapes(gate.shape, up.shape)), group_size)
