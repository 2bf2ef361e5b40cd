"""FP8 activations quantized where they are produced: the ops `fuse_fp8_act_quant` splits W8A8 linears into.

`fp8_linear` with per-token dynamic scales quantizes its input itself. On a GPU that is either work repeated
by every program of the GEMM (each finds the rows' amax, then scales every tile) or a kernel of its own
before each GEMM; both cost more at decode than the e4m3 GEMM reading activations already quantized. So the
graph quantizes once per activation tensor, and where the producer is the residual add + RMSNorm, that
kernel writes e4m3 and the scales instead of the normalized row:
- `quantize_fp8_per_token(x) -> (q, scale)`: q = x / scale saturated to e4m3, scale = amax(|row|) / 448
  ([..., 1], float32), exactly as `fp8_linear`'s reference quantizes.
- `fp8_linear_quantized_input(q, scale, weight, weight_scale, bias, out_dtype)`: the rest of `fp8_linear`.
- `fused_add_rms_norm_quant_fp8(x, residual, weight, eps) -> (q, scale, x + residual)`: the normalized row
  rounded to x's dtype (as the unfused graph hands it on), then quantized.
Composed, they give `fp8_linear`'s reference results bit for bit.
"""

from __future__ import annotations

import torch

from .fused_add_rms_norm import fused_add_rms_norm
from .quant_linear import activation_scale, quantize_activation


@torch.library.custom_op("autodeploy::quantize_fp8_per_token", mutates_args=(),
                         schema="(Tensor x) -> (Tensor, Tensor)")
def quantize_fp8_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: (e4m3 x / scale, float32 scale [..., 1]) with scale = amax of each row / 448."""
    scale = activation_scale(x, None, "token")
    return quantize_activation(x, scale), scale


@quantize_fp8_per_token.register_fake
def _(x):
    return x.new_empty(x.shape, dtype=torch.float8_e4m3fn), x.new_empty(*x.shape[:-1], 1, dtype=torch.float32)


@torch.library.custom_op(
    "autodeploy::fp8_linear_quantized_input", mutates_args=(),
    schema="(Tensor q, Tensor scale, Tensor weight, Tensor weight_scale, Tensor? bias, ScalarType out_dtype) -> Tensor",
)
def fp8_linear_quantized_input(q: torch.Tensor, scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                               bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """Reference: float32 (q @ w.T) * scale * weight_scale (+ bias), in out_dtype (fp8_linear's arithmetic)."""
    q2 = q.reshape(-1, q.shape[-1])
    y = (q2.float() @ weight.float().t()) * scale.reshape(-1, 1).float() * weight_scale.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype).reshape(*q.shape[:-1], weight.shape[0])


@fp8_linear_quantized_input.register_fake
def _(q, scale, weight, weight_scale, bias, out_dtype):
    torch._check(weight.dim() == 2 and weight.shape[1] == q.shape[-1], lambda: "weight must be [N, K]")
    return q.new_empty(*q.shape[:-1], weight.shape[0], dtype=out_dtype)


@torch.library.custom_op("autodeploy::fused_add_rms_norm_quant_fp8", mutates_args=(),
                         schema="(Tensor x, Tensor residual, Tensor weight, float eps) -> (Tensor, Tensor, Tensor)")
def fused_add_rms_norm_quant_fp8(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                                 eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference: fused_add_rms_norm, then the normalized row quantized per token."""
    normed, added = fused_add_rms_norm(x, residual, weight, eps)
    q, scale = quantize_fp8_per_token(normed)
    return q, scale, added


@fused_add_rms_norm_quant_fp8.register_fake
def _(x, residual, weight, eps):
    torch._check(x.shape == residual.shape, lambda: "x and residual must have the same shape")
    return (x.new_empty(x.shape, dtype=torch.float8_e4m3fn), x.new_empty(*x.shape[:-1], 1, dtype=torch.float32),
            torch.empty_like(x))
