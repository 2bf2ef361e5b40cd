"""`autodeploy::fp8_linear` and `autodeploy::int_linear`: the quantized linears `quantize_*` transforms
put where `autodeploy::linear` was. Formats: kernels/quant_format.py.

The references here are the ground truth the Triton backends are tested against: they dequantize
explicitly and multiply in float32, so they are slow but say exactly what the numbers mean.
- fp8_linear (W8A8): activations are quantized to e4m3 too, dynamically per token (`act_quant="token"`),
  per token and group of `act_group_size` consecutive columns (`"group"`: DeepSeek-V3's 1x128 scales,
  vLLM's per-token-group quantization; the last group holds the remainder when the size does not
  divide K) or per tensor (`"tensor"`), or with a checkpoint's static per-tensor `input_scale`;
  y = (q(x) @ w.T) * sx * sw (+ bias), with group scales y = (q(x) * sx per column) @ w.T * sw.
  Quantizing the activations is part of the meaning (a GPU GEMM multiplies e4m3 by e4m3), so the
  reference does it as well.
- int_linear (W4A16 / W8A16): weight-only; y = x @ dequantize(w).T (+ bias), accumulated in float32.
Both return x's dtype.
"""

from __future__ import annotations

import torch

from .quant_format import FP8_DTYPE, FP8_MAX, check_bits, dequantize_fp8, dequantize_int, groups_of

ACT_GROUP_SIZE = 128  # columns per activation scale with act_quant="group" (DeepSeek-V3, vLLM's block FP8)
FP8_SCHEMA = (
    "(Tensor x, Tensor weight, Tensor weight_scale, Tensor? input_scale=None, Tensor? bias=None, "
    f"str act_quant=\"token\", int act_group_size={ACT_GROUP_SIZE}) -> Tensor"
)
INT_SCHEMA = (
    "(Tensor x, Tensor qweight, Tensor scales, Tensor? zeros=None, Tensor? g_idx=None, Tensor? bias=None, "
    "int bits=4, int group_size=128) -> Tensor"
)
ACT_QUANT = ("token", "tensor", "group")


def activation_groups(k: int, group_size: int) -> int:
    """Activation scales per row of k columns: one per group of group_size (-1: one), the last group short
    when group_size does not divide k."""
    if group_size == -1:
        return 1
    if group_size <= 0:
        raise ValueError(f"activation group size must be positive or -1, not {group_size}")
    return -(-k // group_size)


def activation_scale(x: torch.Tensor, input_scale: torch.Tensor | None, act_quant: str,
                     group_size: int = ACT_GROUP_SIZE) -> torch.Tensor:
    """float32 scale of x [M, K]: the static one, else amax / 448 per row ([M, 1]), per row and group of
    group_size columns ([M, G]) or of the whole tensor ([])."""
    if input_scale is not None:
        return input_scale.float().reshape(())
    if act_quant not in ACT_QUANT:
        raise ValueError(f"act_quant must be one of {ACT_QUANT}, not {act_quant!r}")
    if act_quant == "group":
        k = x.shape[-1]
        groups = activation_groups(k, group_size)
        padded = torch.nn.functional.pad(x.abs(), (0, groups * group_size - k)) if groups > 1 else x.abs()
        amax = padded.reshape(*x.shape[:-1], groups, -1).amax(dim=-1)
    else:
        amax = x.abs().amax(dim=-1, keepdim=True) if act_quant == "token" else x.abs().amax()
    return (amax.float() / FP8_MAX).clamp(min=1e-12)


def per_column(scale: torch.Tensor, group_size: int, k: int) -> torch.Tensor:
    """A scale [..., G] of G groups of group_size columns (the last one short) spread over the k columns."""
    if not scale.dim() or scale.shape[-1] == 1:
        return scale
    return scale.repeat_interleave(group_size, dim=-1)[..., :k]


def quantize_activation(x: torch.Tensor, scale: torch.Tensor, group_size: int = -1) -> torch.Tensor:
    """x / scale (per tensor, row, or group of group_size columns) saturated to +-448, as e4m3."""
    return (x.float() / per_column(scale, group_size, x.shape[-1])).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def scaled_fp8_matmul(q: torch.Tensor, scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                      bias: torch.Tensor | None, group_size: int = -1) -> torch.Tensor:
    """float32 y of e4m3 q [M, K] with its activation scale ([], [M, 1] or [M, G] for groups of group_size
    columns) against the e4m3 weight: (q @ w.T) * sx * sw, group scales applied to q's columns first (+ bias).
    A 2-D weight scale holds one scale per group_size x group_size block of the weight (weight_blocks)."""
    if weight_scale.dim() == 2:
        sx = per_column(scale.float(), group_size, q.shape[-1]) if scale.dim() else scale.float()
        y = (q.float() * sx) @ dequantize_fp8(weight, weight_scale, group_size).t()
    elif scale.dim() and scale.shape[-1] > 1:
        sx = per_column(scale.float(), group_size, q.shape[-1])
        y = (q.float() * sx) @ weight.float().t() * weight_scale.float()
    else:
        y = (q.float() @ weight.float().t()) * scale.float() * weight_scale.float()
    return y + bias.float() if bias is not None else y


@torch.library.custom_op("autodeploy::fp8_linear", mutates_args=(), schema=FP8_SCHEMA)
def fp8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    input_scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    act_quant: str = "token",
    act_group_size: int = ACT_GROUP_SIZE,
) -> torch.Tensor:
    """Reference: quantize x, then float32 (q(x) @ w.T) * sx * sw (+ bias)."""
    x2 = x.reshape(-1, x.shape[-1])
    sx = activation_scale(x2, input_scale, act_quant, act_group_size)
    y = scaled_fp8_matmul(quantize_activation(x2, sx, act_group_size), sx, weight, weight_scale, bias, act_group_size)
    return y.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])


@fp8_linear.register_fake
def _(x, weight, weight_scale, input_scale=None, bias=None, act_quant="token", act_group_size=ACT_GROUP_SIZE):
    torch._check(weight.dim() == 2 and weight.shape[1] == x.shape[-1], lambda: "fp8_linear weight must be [N, K]")
    torch._check(act_quant in ACT_QUANT, lambda: f"act_quant must be one of {ACT_QUANT}")
    torch._check(act_group_size > 0 or act_group_size == -1, lambda: "act_group_size must be positive or -1")
    check_weight_blocks(weight, weight_scale, act_group_size if act_quant == "group" else -1)
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def weight_blocks(weight_scale: torch.Tensor) -> bool:
    """Whether an FP8 weight scale is per block ([N / G, K / G] for activation groups of G) rather than per
    channel or tensor."""
    return weight_scale.dim() == 2


def check_weight_blocks(weight: torch.Tensor, weight_scale: torch.Tensor, group_size: int) -> None:
    """Block weight scales need activation groups of the block's size (the GEMM promotes per K group)."""
    if not weight_blocks(weight_scale):
        return
    n, k = weight.shape
    torch._check(group_size > 0, lambda: "FP8 block weight scales need per-token-group activation scales")
    torch._check(tuple(weight_scale.shape) == (-(-n // group_size), -(-k // group_size)),
                 lambda: f"FP8 block weight scales must be [{-(-n // group_size)}, {-(-k // group_size)}] for "
                         f"blocks of {group_size}, got {tuple(weight_scale.shape)}")


@torch.library.custom_op("autodeploy::int_linear", mutates_args=(), schema=INT_SCHEMA)
def int_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None = None,
    g_idx: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    bits: int = 4,
    group_size: int = 128,
) -> torch.Tensor:
    """Reference: dequantize the whole weight to float32, then x @ w.T (+ bias)."""
    w = dequantize_int(qweight, scales, zeros, g_idx, bits, group_size, x.shape[-1])
    y = x.reshape(-1, x.shape[-1]).float() @ w.t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], qweight.shape[0])


@int_linear.register_fake
def _(x, qweight, scales, zeros=None, g_idx=None, bias=None, bits=4, group_size=128):
    k = x.shape[-1]
    check_bits(bits, k)
    groups = groups_of(k, group_size) if g_idx is None else scales.shape[-1]
    torch._check(qweight.shape[-1] * (32 // bits) == k, lambda: f"qweight must be [N, {k}*{bits}/32] int32")
    torch._check(tuple(scales.shape) == (qweight.shape[0], groups), lambda: f"scales must be [N, {groups}]")
    return x.new_empty(*x.shape[:-1], qweight.shape[0])
