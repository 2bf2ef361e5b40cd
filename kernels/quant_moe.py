"""`autodeploy::fp8_moe` and `autodeploy::int_moe`: `autodeploy::moe` with quantized expert weights.

Same routing semantics as kernels/moe.py (the shared `route_to_experts`), each expert's two projections
being the quantized linears of kernels/quant_linear.py, so a quantized MoE model runs the same pipeline:
- fp8_moe: e4m3 experts, w_gate_up [E, 2I, H] with scale [E] (per expert) or [E, 2I] (per channel),
  w_down [E, H, I] with [E] or [E, H]; activations quantized per token, as fp8_linear does, or with a
  checkpoint's static scales [E] per GEMM (w_gate_up_input_scale, w_down_input_scale). With
  `weight_block` B (DeepSeek-V3 / Qwen3-MoE-FP8's layout) the scales are per B x B block, [E, 2I / B, H / B]
  and [E, H / B, I / B], and activations are quantized per token and group of B columns.
- int_moe: weight-only INT4/INT8, w_gate_up int32 [E, 2I, H*bits/32] with scales / zeros [E, 2I, G1],
  w_down int32 [E, H, I*bits/32] with [E, H, G2], all in quant_format's packed layout.
Reference only (plain torch, per expert in float32): the ground truth a grouped-GEMM backend would meet.
"""

from __future__ import annotations

import torch

from .gated_act import GATED_ACTIVATIONS
from .moe import gated_mlp, route_to_experts
from .quant_linear import check_weight_blocks, weight_blocks

FP8_SCHEMA = (
    "(Tensor x, Tensor topk_ids, Tensor topk_weights, Tensor w_gate_up, Tensor w_gate_up_scale, Tensor w_down, "
    "Tensor w_down_scale, str activation, Tensor? b_gate_up=None, Tensor? b_down=None, "
    "Tensor? w_gate_up_input_scale=None, Tensor? w_down_input_scale=None, int weight_block=0) -> Tensor"
)
INT_SCHEMA = (
    "(Tensor x, Tensor topk_ids, Tensor topk_weights, Tensor w_gate_up, Tensor w_gate_up_scales, "
    "Tensor? w_gate_up_zeros, Tensor w_down, Tensor w_down_scales, Tensor? w_down_zeros, str activation, "
    "int bits, int group_size, Tensor? b_gate_up=None, Tensor? b_down=None) -> Tensor"
)


def _pick(t: torch.Tensor | None, expert: int) -> torch.Tensor | None:
    return None if t is None else t[expert]


@torch.library.custom_op("autodeploy::fp8_moe", mutates_args=(), schema=FP8_SCHEMA)
def fp8_moe(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_gate_up_scale: torch.Tensor,
    w_down: torch.Tensor,
    w_down_scale: torch.Tensor,
    activation: str,
    b_gate_up: torch.Tensor | None = None,
    b_down: torch.Tensor | None = None,
    w_gate_up_input_scale: torch.Tensor | None = None,
    w_down_input_scale: torch.Tensor | None = None,
    weight_block: int = 0,
) -> torch.Tensor:
    """Reference: each used expert as two fp8_linear calls around the gate (activation scales per token, per
    token and block-wide group with block weights, or a checkpoint's static ones per expert)."""
    fp8_linear = torch.ops.autodeploy.fp8_linear
    act = ("group", weight_block) if weight_block else ("token",)

    def expert_mlp(e: int, h: torch.Tensor) -> torch.Tensor:
        return gated_mlp(
            h.float(),
            lambda a: fp8_linear(a, w_gate_up[e], w_gate_up_scale[e], _pick(w_gate_up_input_scale, e),
                                 _pick(b_gate_up, e), *act),
            lambda a: fp8_linear(a, w_down[e], w_down_scale[e], _pick(w_down_input_scale, e), _pick(b_down, e), *act),
            activation,
        )

    return route_to_experts(x, topk_ids, topk_weights, expert_mlp)


@torch.library.custom_op("autodeploy::int_moe", mutates_args=(), schema=INT_SCHEMA)
def int_moe(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_gate_up_scales: torch.Tensor,
    w_gate_up_zeros: torch.Tensor | None,
    w_down: torch.Tensor,
    w_down_scales: torch.Tensor,
    w_down_zeros: torch.Tensor | None,
    activation: str,
    bits: int,
    group_size: int,
    b_gate_up: torch.Tensor | None = None,
    b_down: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference: each used expert as two int_linear calls (weights dequantized, float32) around the gate."""
    int_linear = torch.ops.autodeploy.int_linear

    def expert_mlp(e: int, h: torch.Tensor) -> torch.Tensor:
        return gated_mlp(
            h.float(),
            lambda a: int_linear(a, w_gate_up[e], w_gate_up_scales[e], _pick(w_gate_up_zeros, e), None,
                                 _pick(b_gate_up, e), bits, group_size),
            lambda a: int_linear(a, w_down[e], w_down_scales[e], _pick(w_down_zeros, e), None,
                                 _pick(b_down, e), bits, group_size),
            activation,
        )

    return route_to_experts(x, topk_ids, topk_weights, expert_mlp)


def _check_experts(activation: str, w_gate_up: torch.Tensor, w_down: torch.Tensor, packing: int) -> None:
    torch._check(activation in GATED_ACTIVATIONS, lambda: f"unknown activation {activation!r}")
    torch._check(w_gate_up.dim() == 3 and w_down.dim() == 3, lambda: "expert weights must be [E, out, in]")
    torch._check(w_gate_up.shape[1] == 2 * w_down.shape[2] * packing,
                 lambda: "w_gate_up must be [E, 2I, H], w_down [E, H, I] (packed along the last dim)")


@fp8_moe.register_fake
def _(x, topk_ids, topk_weights, w_gate_up, w_gate_up_scale, w_down, w_down_scale, activation, b_gate_up=None,
      b_down=None, w_gate_up_input_scale=None, w_down_input_scale=None, weight_block=0):
    _check_experts(activation, w_gate_up, w_down, 1)
    if weight_block or weight_blocks(w_gate_up_scale[0]) or weight_blocks(w_down_scale[0]):
        torch._check(w_gate_up_input_scale is None and w_down_input_scale is None,
                     lambda: "FP8 block experts quantize activations dynamically (no static input scales)")
        for w, scale in ((w_gate_up, w_gate_up_scale), (w_down, w_down_scale)):
            torch._check(scale.dim() == 3, lambda: "FP8 block expert scales must be [E, N / B, K / B]")
            check_weight_blocks(w[0], scale[0], weight_block if weight_block else -1)
    return torch.empty_like(x)


@int_moe.register_fake
def _(x, topk_ids, topk_weights, w_gate_up, w_gate_up_scales, w_gate_up_zeros, w_down, w_down_scales,
      w_down_zeros, activation, bits, group_size, b_gate_up=None, b_down=None):
    _check_experts(activation, w_gate_up, w_down, 32 // bits)
    return torch.empty_like(x)
