"""Activation scales stored group-major by every quantizing op (kernels/quant_act.empty_scales; their values against
the references: test_fuse_fp8_act_quant.py), read in either layout by the FP8 GEMV and dot, and the weight scale's
cuBLASLt layout made once per weight (kernels/weight_scale_layout.py)."""

from __future__ import annotations

import gc

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import autodeploy.kernels  # noqa: F401
from autodeploy.kernels import triton_fp8_act_quant, triton_gated_act, triton_rms_norm
from autodeploy.kernels.quant_format import quantize_fp8
from autodeploy.kernels.triton_fp8_gemv import fp8_gemv
from autodeploy.kernels.triton_quant_fp8_linear import skinny_fp8_linear
from autodeploy.kernels.weight_scale_layout import _LAYOUTS, weight_scale_layout

ops = torch.ops.autodeploy
ROWS, K, GROUP = 3, 160, 32  # 5 groups


def _quantized(x, residual, gate, up, backend):
    """(q, scale) of the three quantizing ops, from the references (backend None) or the Triton backends."""
    if backend is None:
        return [ops.quantize_fp8_per_token(x, GROUP),
                ops.fused_add_rms_norm_quant_fp8(x, residual, torch.ones(K), 1e-6, GROUP)[:2],
                ops.gated_act_quant_fp8(gate, up, "silu", GROUP)]
    return [triton_fp8_act_quant.quantize_fp8_per_token(x, GROUP),
            triton_rms_norm.fused_add_rms_norm_quant_fp8(x, residual, torch.ones(K), 1e-6, GROUP)[:2],
            triton_gated_act.gated_act_quant_fp8(gate, up, "silu", GROUP)]


@pytest.mark.parametrize("backend", [None, "triton"])
def test_quantizing_ops_store_scales_group_major(backend):
    torch.manual_seed(0)
    x, residual, gate, up = (torch.randn(ROWS, K) for _ in range(4))
    for q, scale in _quantized(x, residual, gate, up, backend):
        assert scale.shape == (ROWS, K // GROUP) and scale.stride() == (1, ROWS)
    with FakeTensorMode():
        fake = torch.empty(2, ROWS, K)
        _, scale = ops.quantize_fp8_per_token(fake, GROUP)
        assert scale.shape == (2, ROWS, K // GROUP) and scale.stride() == (ROWS, 1, 2 * ROWS)


@pytest.mark.parametrize("path", ["gemv", "dot"])
def test_gemms_read_either_scale_layout(path):
    torch.manual_seed(2)
    q, scale = ops.quantize_fp8_per_token(torch.randn(ROWS, K), GROUP)
    weight, weight_scale = quantize_fp8(torch.randn(24, K), True)
    if path == "gemv":
        run = lambda s: fp8_gemv(q, s, weight, weight_scale, None, torch.float32, GROUP)  # noqa: E731
    else:
        run = lambda s: skinny_fp8_linear(q, weight, weight_scale, x_scale=s, out_dtype=torch.float32,  # noqa: E731
                                          x_group=GROUP, block_n=32, block_k=32)
    row_major = scale.contiguous()
    assert row_major.stride() != scale.stride()
    want = ops.fp8_linear_quantized_input(q, scale, weight, weight_scale, None, torch.float32, GROUP)
    torch.testing.assert_close(run(scale), want, rtol=1e-5, atol=1e-5)
    assert torch.equal(run(scale), run(row_major))


def test_weight_scale_layout_is_made_once_per_scale():
    per_channel, per_tensor = torch.rand(48) + 0.5, torch.tensor(0.25)
    layout = weight_scale_layout(per_channel, 4, 48)
    assert layout.shape == (4, 48) and layout.is_contiguous() and torch.equal(layout, per_channel.expand(4, 48))
    assert weight_scale_layout(per_channel, 4, 48) is layout
    assert torch.equal(weight_scale_layout(per_tensor, 1, 48), torch.full((1, 48), 0.25))
    keys = len(_LAYOUTS)
    view = weight_scale_layout(per_channel, 1, 48)  # already the layout: a view of it, nothing kept
    assert view.data_ptr() == per_channel.data_ptr() and len(_LAYOUTS) == keys
    per_channel.mul_(2)  # an in-place update makes it again
    assert torch.equal(weight_scale_layout(per_channel, 4, 48), per_channel.expand(4, 48))
    keys = len(_LAYOUTS)
    del per_channel, per_tensor, view
    gc.collect()
    assert len(_LAYOUTS) == keys - 2
