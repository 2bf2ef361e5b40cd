"""The quantized GEMV kernels (kernels/triton_quant_gemv.py) against the reference ops, in the Triton
interpreter on CPU (compiled on GPUs): odd shapes, groups, zero points, several rows, poisoned outputs."""

import pytest
import torch

import autodeploy.kernels  # noqa: F401
from autodeploy.kernels.quant_format import quantize_fp8, quantize_int

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _device():
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("bits,group,symmetric", [(4, 32, True), (4, 128, False), (4, -1, True), (8, 64, True), (8, -1, False)])
@pytest.mark.parametrize("rows", [1, 3])
def test_gemv_int_matches_reference(bits, group, symmetric, rows):
    from autodeploy.kernels.triton_quant_gemv import gemv_int_linear, gemv_int_supported

    torch.manual_seed(bits * 100 + rows)
    n, k = 37, 256
    qweight, scales, zeros = quantize_int(torch.randn(n, k), bits, group, symmetric)
    if zeros is not None:  # a scale search leaves zero points fractional
        zeros = zeros + torch.rand_like(zeros)
    x, bias = torch.randn(rows, k), torch.randn(n)
    dev = _device()
    args = [t.to(dev) if t is not None else None for t in (x, qweight, scales, zeros, bias)]
    assert gemv_int_supported(rows, None, bits, group, k)
    got = gemv_int_linear(*args, bits, group, block_n=8, block_w=16)
    want = torch.ops.autodeploy.int_linear(x, qweight, scales, zeros, None, bias, bits, group)
    assert not got.isnan().any()
    torch.testing.assert_close(got.cpu().float(), want.float(), rtol=1e-4, atol=1e-4)


def test_gemv_int_refuses_what_it_cannot_do():
    from autodeploy.kernels.triton_quant_gemv import gemv_int_supported

    assert not gemv_int_supported(8, None, 4, 128, 256)  # too many rows
    assert not gemv_int_supported(1, torch.zeros(256), 4, 128, 256)  # act-order gather
    assert not gemv_int_supported(1, None, 4, 12, 264)  # groups that split a word


@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("per_channel", [True, False])
def test_static_scale_quantization_then_fp8_gemv_is_fp8_linear(rows, per_channel):
    """A static input scale (FP8 checkpoints): x / scale in one kernel, the scale repeated per row, which the GEMV
    on quantized x reads as per-row scales: together fp8_linear's reference."""
    from autodeploy.kernels.quant_linear import quantize_activation
    from autodeploy.kernels.triton_fp8_act_quant import quantize_rows_fp8
    from autodeploy.kernels.triton_fp8_gemv import fp8_gemv

    torch.manual_seed(rows)
    n, k = 29, 384
    weight, w_scale = quantize_fp8(torch.randn(n, k), per_channel)
    x, input_scale = torch.randn(rows, k), torch.tensor(0.004)  # some of x saturates at +-448
    dev = _device()
    q, scale = quantize_rows_fp8(x.to(dev), -1, input_scale.to(dev))
    assert torch.equal(q.cpu().float(), quantize_activation(x, input_scale).float())
    assert torch.equal(scale.cpu(), input_scale.expand(rows, 1))
    got = fp8_gemv(q, scale, weight.to(dev), w_scale.to(dev), None, torch.float32)
    want = torch.ops.autodeploy.fp8_linear(x, weight, w_scale, input_scale, None, "token")
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-4)


def test_one_kernel_activation_quantization_matches_reference():
    from autodeploy.kernels.quant_linear import activation_scale, quantize_activation
    from autodeploy.kernels.triton_fp8_act_quant import quantize_rows_fp8

    torch.manual_seed(0)
    x = torch.randn(5, 1500) * torch.tensor([1.0, 10.0, 0.1, 3.0, 0.0])[:, None]
    q, scale = quantize_rows_fp8(x.to(_device()))
    want_scale = activation_scale(x, None, "token")
    torch.testing.assert_close(scale.cpu(), want_scale)
    torch.testing.assert_close(q.cpu().float(), quantize_activation(x, want_scale).float())
