"""The FP8 GEMV on pre-quantized activations (kernels/triton_fp8_gemv.py) against fp8_linear_quantized_input's
reference: per-row and per-group activation scales (a short last group too), per-channel, per-tensor and block
weight scales, K past one K step and not a multiple of it, odd N; outputs poisoned with NaN."""

from __future__ import annotations

import zlib

import pytest
import torch

import autodeploy.kernels  # noqa: F401
from autodeploy.kernels.quant_format import FP8_DTYPE, quantize_fp8_blocks
from autodeploy.kernels.triton_fp8_gemv import fp8_gemv, fp8_gemv_supported

ops = torch.ops.autodeploy


def _gen(*key):
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


@pytest.fixture
def poisoned(monkeypatch):
    empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: empty(*a, **k).fill_(float("nan")))


def _inputs(rows, n, k, group_size, per_channel):
    g = _gen(rows, n, k, group_size, per_channel)
    weight = (torch.randn(n, k, generator=g) * 64).clamp(-448, 448).to(FP8_DTYPE)
    weight_scale = torch.rand(n, generator=g) + 0.5 if per_channel else torch.tensor(0.75)
    q, scale = ops.quantize_fp8_per_token(torch.randn(rows, k, generator=g), group_size)
    return q, scale, weight, weight_scale, torch.randn(n, generator=g)


@pytest.mark.parametrize("n,k,group_size", [(40, 512, 128), (37, 2064, 128), (9, 96, 32), (24, 4112, -1),
                                             (13, 176, 64)])
@pytest.mark.parametrize("rows", [1, 3, 4])
@pytest.mark.parametrize("per_channel", [True, False])
def test_gemv_matches_reference(n, k, group_size, rows, per_channel, poisoned):
    q, scale, weight, weight_scale, bias = _inputs(rows, n, k, group_size, per_channel)
    want = ops.fp8_linear_quantized_input(q, scale, weight, weight_scale, bias, torch.float32, group_size)
    got = fp8_gemv(q, scale, weight, weight_scale, bias, torch.float32, group_size)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * want.abs().max().item())


def _block_inputs(rows, n, k, block):
    g = _gen(rows, n, k, block)
    weight, weight_scale = quantize_fp8_blocks(torch.randn(n, k, generator=g), block)
    q, scale = ops.quantize_fp8_per_token(torch.randn(rows, k, generator=g), block)
    return q, scale, weight, weight_scale, torch.randn(n, generator=g)


# N, K, block: short last blocks along N and K, K past one K step (2,048 columns at (4, 4)), a single K block
@pytest.mark.parametrize("n,k,block", [(300, 512, 128), (37, 2064, 128), (72, 96, 32), (130, 128, 128), (9, 176, 64)])
@pytest.mark.parametrize("rows", [1, 3, 4])
def test_gemv_applies_weight_blocks(n, k, block, rows, poisoned):
    q, scale, weight, weight_scale, bias = _block_inputs(rows, n, k, block)
    want = ops.fp8_linear_quantized_input(q, scale, weight, weight_scale, bias, torch.float32, block)
    got = fp8_gemv(q, scale, weight, weight_scale, bias, torch.float32, block)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * want.abs().max().item())


def test_gemv_keeps_leading_dims_and_dtype(poisoned):
    q, scale, weight, weight_scale, _ = _inputs(2, 24, 256, 128, True)
    want = ops.fp8_linear_quantized_input(q, scale, weight, weight_scale, None, torch.bfloat16, 128)
    got = fp8_gemv(q.view(2, 1, 256), scale.view(2, 1, -1), weight, weight_scale, None, torch.bfloat16, 128)
    assert got.shape == (2, 1, 24) and got.dtype == torch.bfloat16
    torch.testing.assert_close(got.view(2, 24), want, rtol=2**-7, atol=1e-3)


@pytest.mark.parametrize("rows,k,group_size,ok", [(1, 4096, 128, True), (4, 4096, -1, True), (5, 4096, 128, False),
                                                  (0, 4096, 128, False), (1, 4104, 128, False),
                                                  (1, 4096, 8, False), (1, 4112, 128, True)])
def test_supported(rows, k, group_size, ok):
    assert fp8_gemv_supported(rows, k, group_size) is ok


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("n,k,group_size", [(6144, 4096, 128), (4096, 14336, 128), (1000, 4112, 128),
                                            (4096, 4096, -1)])
@pytest.mark.parametrize("rows", [1, 2, 4])
@pytest.mark.parametrize("block_n,num_warps", [(8, 4), (16, 2)])
def test_gemv_on_gpu(n, k, group_size, rows, block_n, num_warps):
    q, scale, weight, weight_scale, bias = (t.cuda() for t in _inputs(rows, n, k, group_size, True))
    want = ops.fp8_linear_quantized_input(q, scale, weight, weight_scale, bias, torch.float32, group_size)
    got = fp8_gemv(q, scale, weight, weight_scale, bias, torch.float32, group_size, block_n, num_warps)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * want.abs().max().item())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("n,k", [(6144, 4096), (4096, 14336), (1000, 4224)])
@pytest.mark.parametrize("rows", [1, 4])
def test_block_gemv_on_gpu(n, k, rows):
    q, scale, weight, weight_scale, bias = (t.cuda() for t in _block_inputs(rows, n, k, 128))
    want = ops.fp8_linear_quantized_input(q, scale, weight, weight_scale, bias, torch.float32, 128)
    for block_n, num_warps in ((4, 4), (8, 2)):
        got = fp8_gemv(q, scale, weight, weight_scale, bias, torch.float32, 128, block_n, num_warps)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * want.abs().max().item())
