"""The INT4 GEMV on its interleaved copy (kernels/triton_int4_gemv.py) against the int_linear reference.

float32 activations check the arithmetic itself (subnormal codes times scaled x, the per-group coefficients)
to float32 rounding; bf16 ones the dtype path. Shapes with K past one K step and not a multiple of it, odd
N, one group per row; outputs poisoned with NaN so a row or column the kernel forgets shows."""

from __future__ import annotations

import zlib

import pytest
import torch

import autodeploy.kernels  # noqa: F401
from autodeploy.kernels.quant_format import pack_int, quantize_int, unpack_int
from autodeploy.kernels.triton_int4_gemv import (gemv_coefficients, int4_gemv, int4_gemv_supported,
                                                 interleave_int4)

ops = torch.ops.autodeploy


def _gen(*key):
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def _weights(n, k, group_size, symmetric, device="cpu"):
    g = _gen(n, k, group_size, symmetric)
    qweight, scales, zeros = quantize_int(torch.randn(n, k, generator=g) / k**0.5, 4, group_size, symmetric)
    if zeros is not None:  # fractional, as the scale search leaves them
        zeros = (zeros + torch.rand(zeros.shape, generator=g) - 0.5).clamp(0, 15)
    return [None if t is None else t.to(device) for t in (qweight, scales, zeros)]


@pytest.fixture
def poisoned(monkeypatch):
    empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: empty(*a, **k).fill_(float("nan")))


def test_interleave_puts_column_4j_plus_i_in_word_i_slot_j():
    codes = torch.randint(0, 16, (5, 64), generator=_gen("codes"), dtype=torch.int32)
    words = unpack_int(interleave_int4(pack_int(codes, 4)), 4, 64).reshape(5, 2, 4, 8)  # [n, block, word, slot]
    blocks = codes.reshape(5, 2, 8, 4)  # [n, block, j, i]: column 4j + i
    assert torch.equal(words, blocks.transpose(-1, -2))


@pytest.mark.parametrize("n,k,group_size", [(40, 512, 128), (37, 288, 32), (64, 1024, -1), (9, 96, 32)])
@pytest.mark.parametrize("rows", [1, 3, 4])
@pytest.mark.parametrize("symmetric", [True, False])
def test_gemv_matches_reference(n, k, group_size, rows, symmetric, poisoned):
    qweight, scales, zeros = _weights(n, k, group_size, symmetric)
    bias = torch.randn(n, generator=_gen("bias", n))
    x = torch.randn(rows, k, generator=_gen("x", n, k, rows))
    want = ops.int_linear(x, qweight, scales, zeros, None, bias, 4, group_size)
    got = int4_gemv(x, interleave_int4(qweight), gemv_coefficients(scales, zeros), bias, group_size)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * want.abs().max().item())


@pytest.mark.parametrize("block_n,num_warps", [(4, 1), (16, 2)])
def test_gemv_knobs_and_bf16(block_n, num_warps, poisoned):
    qweight, scales, zeros = _weights(33, 1536, 128, False)
    scales, zeros = scales.bfloat16(), zeros.bfloat16()
    x = torch.randn(2, 1, 1536, generator=_gen("x16")).bfloat16()
    want = ops.int_linear(x, qweight, scales, zeros, None, None, 4, 128)
    got = int4_gemv(x, interleave_int4(qweight), gemv_coefficients(scales, zeros), None, 128, block_n, num_warps)
    assert got.shape == want.shape and got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=1e-2 * want.float().abs().max().item())


def test_gemv_takes_large_activations(poisoned):
    """Products are code * x * 2**-30 (x scaled up by a power of two): activations far past LLMs' stay exact."""
    qweight, scales, zeros = _weights(16, 256, 32, False)
    x = torch.randn(1, 256, generator=_gen("large")) * 3e4
    x[0, 0:32:4] = torch.tensor([1e5, -1e5, 6e4, -6e4, 1e-30, -1e-30, 0.0, -0.0])  # the 8 code slots of word 0
    want = ops.int_linear(x, qweight, scales, zeros, None, None, 4, 32)
    got = int4_gemv(x, interleave_int4(qweight), gemv_coefficients(scales, zeros), None, 32)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * want.abs().max().item())


@pytest.mark.parametrize("rows,k,group_size,ok", [
    (1, 4096, 128, True), (4, 4096, -1, True), (5, 4096, 128, False), (0, 4096, 128, False),
    (1, 4112, 16, False),  # K not in blocks of 32
    (1, 4096, 16, False),  # a group smaller than a thread's 4 words
    (1, 4160, 96, False),  # 96 does not divide 4160
])
def test_supported(rows, k, group_size, ok):
    assert int4_gemv_supported(rows, k, group_size) is ok


def test_interleave_refuses_partial_blocks():
    with pytest.raises(ValueError, match="divisible by 32"):
        interleave_int4(torch.zeros(4, 6, dtype=torch.int32))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("n,k", [(6144, 4096), (4096, 14336), (1000, 4128)])
@pytest.mark.parametrize("rows", [1, 2, 4])
def test_gemv_on_gpu(n, k, rows):
    qweight, scales, zeros = _weights(n, k, 32 if k % 128 else 128, False, "cuda")
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    want = ops.int_linear(x, qweight, scales.bfloat16(), zeros.bfloat16(), None, None, 4, 32 if k % 128 else 128)
    for block_n, num_warps in ((8, 4), (4, 2)):
        got = int4_gemv(x, interleave_int4(qweight), gemv_coefficients(scales.bfloat16(), zeros.bfloat16()), None,
                        32 if k % 128 else 128, block_n, num_warps)
        torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=1e-2 * want.float().abs().max().item())
