"""Triton backends of the quantized linears (interpreter on CPU) against the torch references.

Outputs the kernels allocate are poisoned (NaN) so an unwritten element fails; shapes have odd N and
K that is not a multiple of the K tile. The interpreter's half-precision tl.dot and its fp8 casts are
wrong, so on CPU the kernels multiply in float32 and round to e4m3 arithmetically (INTERPRET: the same
values), and the GPU paths (fp16 dot, hardware e4m3 casts, torch._scaled_mm) are the `gpu` tests."""

from __future__ import annotations

import zlib

import pytest
import torch

import autodeploy.kernels  # noqa: F401
from autodeploy.errors import QuantizationError
from autodeploy.kernels.quant_format import pack_int, quantize_fp8, quantize_int

ops = torch.ops.autodeploy
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def poisoned(monkeypatch):
    """Fresh outputs come back full of NaN instead of whatever memory held."""
    empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: empty(*a, **k).fill_(float("nan")))


def _gen(*key):
    """A generator seeded from the test's parameters, the same in every process (unlike hash())."""
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def _assert_close(got, want, dtype):
    assert not got.isnan().any(), "unwritten (poisoned) output elements"
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol * max(1.0, want.abs().max().item()))


# rows, N, K: odd N; K = 384 / 1152 are not multiples of the 256-wide test tile (masked tail words);
# every K is a multiple of every group size below
INT_SHAPES = [(1, 37, 384), (3, 33, 1152), (16, 70, 768)]
INT_FORMATS = [(4, 32, True), (4, 32, False), (4, 64, False), (4, 128, True), (4, -1, True), (8, 32, False),
               (8, 128, True), (8, -1, False), (4, 48, True)]  # 48: no power of two -> the gather path


def _int_case(shape, bits, group_size, symmetric, dtype=torch.float32):
    rows, n, k = shape
    g = _gen(shape, bits, group_size, symmetric)
    qweight, scales, zeros = quantize_int(torch.randn(n, k, generator=g), bits, group_size, symmetric)
    x = torch.randn(2, rows, k, generator=g).to(dtype)
    return x, qweight, scales.to(dtype), None if zeros is None else zeros.to(dtype), torch.randn(n, generator=g)


@pytest.mark.parametrize("shape", INT_SHAPES, ids=str)
@pytest.mark.parametrize("bits,group_size,symmetric", INT_FORMATS, ids=str)
def test_skinny_int_linear_matches_reference(shape, bits, group_size, symmetric, poisoned):
    from autodeploy.kernels.triton_quant_int_linear import skinny_int_linear

    x, qweight, scales, zeros, bias = _int_case(shape, bits, group_size, symmetric)
    want = ops.int_linear(x, qweight, scales, zeros, None, bias, bits, group_size)
    splat = shape[0] == 3  # one shape through the other unpacking variant
    got = skinny_int_linear(x, qweight, scales, zeros, None, bias, bits, group_size, block_n=16, block_k=256,
                            splat_words=splat)
    _assert_close(got, want, x.dtype)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("zeros", [False, True])
def test_skinny_int_linear_act_order(bits, zeros, poisoned):
    from autodeploy.kernels.triton_quant_int_linear import skinny_int_linear

    n, k, group = 29, 128, 32
    g = _gen(bits, zeros)
    qweight = pack_int(torch.randint(0, 2**bits, (n, k), generator=g, dtype=torch.int32), bits)
    scales = torch.rand(n, k // group, generator=g) / 10
    zero = torch.randint(0, 2**bits, (n, k // group), generator=g).float() if zeros else None
    g_idx = (torch.arange(k) // group)[torch.randperm(k, generator=g)].to(torch.int32)
    x = torch.randn(5, k, generator=g)
    want = ops.int_linear(x, qweight, scales, zero, g_idx, None, bits, group)
    _assert_close(skinny_int_linear(x, qweight, scales, zero, g_idx, None, bits, group, block_n=16, block_k=64),
                  want, x.dtype)


@pytest.mark.parametrize("bits", [4, 8])
def test_int_kernels_on_a_k_slice_with_global_groups(bits, poisoned):
    """A row-parallel act-order shard (tensor parallelism): K / 2 columns whose g_idx slice indexes all
    G groups' scales / zeros. Each kernel matches the reference on it; the partial products sum to the
    whole weight's reference."""
    from autodeploy.kernels.quant_format import dequantize_int
    from autodeploy.kernels.triton_quant_int_linear import dequantize_int_triton, skinny_int_linear

    n, k, group = 29, 192, 32
    g = _gen("k slice", bits)
    codes = torch.randint(0, 2**bits, (n, k), generator=g, dtype=torch.int32)
    scales = torch.rand(n, k // group, generator=g) / 10
    zeros = torch.randint(0, 2**bits, (n, k // group), generator=g).float()
    g_idx = (torch.arange(k) // group)[torch.randperm(k, generator=g)].to(torch.int32)
    x = torch.randn(3, k, generator=g)
    want = ops.int_linear(x, pack_int(codes, bits), scales, zeros, g_idx, None, bits, group)
    total = torch.zeros_like(want)
    for cols in (slice(0, k // 2), slice(k // 2, k)):  # 96 columns each, drawn from all 6 groups
        qweight, local_g_idx = pack_int(codes[:, cols], bits), g_idx[cols]
        dense = dequantize_int_triton(qweight, scales, zeros, local_g_idx, bits, group, k // 2, torch.float32)
        _assert_close(dense, dequantize_int(qweight, scales, zeros, local_g_idx, bits, group, k // 2), torch.float32)
        total += skinny_int_linear(x[:, cols], qweight, scales, zeros, local_g_idx, None, bits, group,
                                   block_n=16, block_k=64)
    _assert_close(total, want, x.dtype)


def test_skinny_int_linear_bf16_activations_and_scales(poisoned):
    """bf16 in and out (the dtype a GPU model runs in); the interpreter still multiplies in float32."""
    from autodeploy.kernels.triton_quant_int_linear import skinny_int_linear

    x, qweight, scales, zeros, bias = _int_case((2, 40, 96), 4, 32, False, torch.bfloat16)
    got = skinny_int_linear(x, qweight, scales, zeros, None, bias, 4, 32, block_n=16, block_k=64)
    assert got.dtype == torch.bfloat16
    _assert_close(got, ops.int_linear(x.double(), qweight, scales, zeros, None, bias, 4, 32), torch.bfloat16)


@pytest.mark.parametrize("bits,group_size,symmetric", [(4, 32, False), (8, -1, True), (4, 48, True)], ids=str)
def test_dequantize_kernel_matches_reference(bits, group_size, symmetric, poisoned):
    from autodeploy.kernels.quant_format import dequantize_int
    from autodeploy.kernels.triton_quant_int_linear import dequantize_int_triton

    _, qweight, scales, zeros, _ = _int_case((1, 70, 192), bits, group_size, symmetric)
    got = dequantize_int_triton(qweight, scales, zeros, None, bits, group_size, 192, torch.float32)
    _assert_close(got, dequantize_int(qweight, scales, zeros, None, bits, group_size, 192), torch.float32)


def test_int_backend_rejects_bad_layout():
    from autodeploy.kernels.triton_quant_int_linear import skinny_int_linear

    qweight, scales, _ = quantize_int(torch.randn(8, 128), 4, 32, True)
    with pytest.raises(QuantizationError, match="does not divide"):
        skinny_int_linear(torch.randn(1, 128), qweight, scales, None, None, None, 4, 48)
    with pytest.raises(QuantizationError, match="words per row"):
        skinny_int_linear(torch.randn(1, 64), qweight, scales, None, None, None, 4, 32)


FP8_SHAPES = [(1, 37, 256), (5, 33, 200), (16, 64, 96)]


@pytest.mark.parametrize("shape", FP8_SHAPES, ids=str)
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("act", ["token", "tensor", "static"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_skinny_fp8_linear_matches_reference(shape, per_channel, act, dtype, poisoned):
    from autodeploy.kernels.triton_quant_fp8_linear import skinny_fp8_linear

    rows, n, k = shape
    g = _gen(shape, per_channel, act, dtype)
    weight, weight_scale = quantize_fp8(torch.randn(n, k, generator=g), per_channel)
    x = (torch.randn(rows, k, generator=g) * torch.linspace(0.2, 3, rows)[:, None]).to(dtype)
    x[0, :3] = 0  # zero and tiny entries round through e4m3's subnormals
    bias = torch.randn(n, generator=g).to(dtype)
    input_scale = torch.tensor(0.03) if act == "static" else None
    act_quant = "token" if act == "static" else act
    want = ops.fp8_linear(x, weight, weight_scale, input_scale, bias, act_quant)
    got = skinny_fp8_linear(x, weight, weight_scale, input_scale, bias, act_quant, block_n=16, block_k=64)
    assert got.dtype == dtype
    _assert_close(got, want, torch.float32 if dtype == torch.float32 else dtype)


def test_backends_registered_and_cpu_falls_back_to_reference():
    from autodeploy.kernels.triton_backends import BACKENDS

    assert set(BACKENDS["int_linear"]) == set(BACKENDS["fp8_linear"]) == {"torch", "triton"}
    x, qweight, scales, zeros, bias = _int_case((40, 24, 96), 4, 32, False)
    torch.testing.assert_close(ops.int_linear_triton(x, qweight, scales, zeros, None, bias, 4, 32),
                               ops.int_linear(x, qweight, scales, zeros, None, bias, 4, 32))
    weight, weight_scale = quantize_fp8(torch.randn(24, 96), True)
    torch.testing.assert_close(ops.fp8_linear_triton(x, weight, weight_scale),
                               ops.fp8_linear(x, weight, weight_scale))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("rows", [1, 7, 16, 64])
@pytest.mark.parametrize("bits,group_size,symmetric", [(4, 128, True), (4, 32, False), (8, -1, True)], ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_int_linear_backend_on_gpu(rows, bits, group_size, symmetric, dtype):
    x, qweight, scales, zeros, bias = (t.cuda() if t is not None else None
                                       for t in _int_case((rows, 1000, 1024), bits, group_size, symmetric, dtype))
    want = ops.int_linear(x.float(), qweight, scales, zeros, None, bias, bits, group_size)
    _assert_close(ops.int_linear_triton(x, qweight, scales, zeros, None, bias.to(dtype), bits, group_size), want, dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("rows", [1, 3, 7, 16, 64, 200])
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("act_quant", ["token", "group", "tensor", "static"])
def test_fp8_linear_backend_on_gpu(rows, per_channel, act_quant):
    g = _gen(rows, per_channel, act_quant)
    weight, weight_scale = (t.cuda() for t in quantize_fp8(torch.randn(1024, 2048 + 64, generator=g), per_channel))
    x = torch.randn(rows, 2048 + 64, generator=g).cuda().bfloat16()
    input_scale = torch.tensor(0.01, device="cuda") if act_quant == "static" else None
    act_quant = "token" if act_quant == "static" else act_quant
    want = ops.fp8_linear(x.float(), weight, weight_scale, input_scale, None, act_quant)
    _assert_close(ops.fp8_linear_triton(x, weight, weight_scale, input_scale, None, act_quant), want, torch.bfloat16)
