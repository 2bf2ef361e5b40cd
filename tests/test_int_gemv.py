"""The INT4 / INT8 GEMV on its interleaved copy (kernels/triton_int_gemv.py) against the int_linear reference.

float32 activations check the arithmetic itself (subnormal codes times scaled x, the per-group coefficients)
to float32 rounding; bf16 ones the dtype path. Shapes with K past one K step and not a multiple of it, odd
N, one group per row; outputs poisoned with NaN so a row or column the kernel forgets shows."""

from __future__ import annotations

import zlib

import pytest
import torch

import autodeploy.kernels  # noqa: F401
from autodeploy.kernels.quant_format import pack_int, quantize_int, unpack_int
from autodeploy.kernels.triton_int_gemv import (gemv_coefficients, int_gemv, int_gemv_supported, interleave_codes,
                                                 knobs_for)

ops = torch.ops.autodeploy


def _gen(*key):
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def _weights(n, k, group_size, symmetric, bits=4, device="cpu"):
    g = _gen(n, k, group_size, symmetric, bits)
    qweight, scales, zeros = quantize_int(torch.randn(n, k, generator=g) / k**0.5, bits, group_size, symmetric)
    if zeros is not None:  # fractional, as the scale search leaves them
        zeros = (zeros + torch.rand(zeros.shape, generator=g) - 0.5).clamp(0, 2**bits - 1)
    return [None if t is None else t.to(device) for t in (qweight, scales, zeros)]


def _gemv(x, qweight, scales, zeros, bias, group_size, bits, *knobs):
    return int_gemv(x, interleave_codes(qweight, bits), gemv_coefficients(scales, zeros, bits), bias, group_size, bits,
                    *knobs)


@pytest.fixture
def poisoned(monkeypatch):
    empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: empty(*a, **k).fill_(float("nan")))


@pytest.mark.parametrize("bits", [4, 8])
def test_interleave_puts_column_4j_plus_i_in_word_i_slot_j(bits):
    per_word = 32 // bits
    codes = torch.randint(0, 2**bits, (5, 8 * per_word), generator=_gen("codes", bits), dtype=torch.int32)
    words = unpack_int(interleave_codes(pack_int(codes, bits), bits), bits, 8 * per_word)
    words = words.reshape(5, 2, 4, per_word)  # [n, block, word, slot]
    blocks = codes.reshape(5, 2, per_word, 4)  # [n, block, j, i]: column 4j + i
    assert torch.equal(words, blocks.transpose(-1, -2))


@pytest.mark.parametrize("n,k,group_size,bits", [
    (40, 512, 128, 4), (37, 288, 32, 4), (64, 1024, -1, 4), (9, 96, 32, 4),
    (40, 512, -1, 8), (37, 272, 16, 8), (9, 1040, 80, 8),
])
@pytest.mark.parametrize("rows", [1, 3, 4])
@pytest.mark.parametrize("symmetric", [True, False])
def test_gemv_matches_reference(n, k, group_size, bits, rows, symmetric, poisoned):
    qweight, scales, zeros = _weights(n, k, group_size, symmetric, bits)
    bias = torch.randn(n, generator=_gen("bias", n))
    x = torch.randn(rows, k, generator=_gen("x", n, k, rows))
    want = ops.int_linear(x, qweight, scales, zeros, None, bias, bits, group_size)
    got = _gemv(x, qweight, scales, zeros, bias, group_size, bits)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * want.abs().max().item())


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("magnitude", [2.0**-70, 2.0**20])
def test_gemv_keeps_x_far_from_one(bits, magnitude, poisoned):
    """Products are formed at 2**-48 of code * x: x between about 2**-78 and 2**27 stays exact to float32."""
    qweight, scales, zeros = _weights(24, 512, 128, False, bits)
    x = torch.randn(1, 512, generator=_gen("far", bits)) * magnitude
    want = ops.int_linear(x, qweight, scales, zeros, None, None, bits, 128)
    got = _gemv(x, qweight, scales, zeros, None, 128, bits)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * want.abs().max().item())


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("block_n,num_warps", [(4, 1), (16, 2)])
def test_gemv_knobs_and_bf16(bits, block_n, num_warps, poisoned):
    qweight, scales, zeros = _weights(33, 1536, 128, False, bits)
    scales, zeros = scales.bfloat16(), zeros.bfloat16()
    x = torch.randn(2, 1, 1536, generator=_gen("x16")).bfloat16()
    want = ops.int_linear(x, qweight, scales, zeros, None, None, bits, 128)
    got = _gemv(x, qweight, scales, zeros, None, 128, bits, block_n, num_warps)
    assert got.shape == want.shape and got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=1e-2 * want.float().abs().max().item())


@pytest.mark.parametrize("bits", [4, 8])
def test_gemv_takes_large_activations(bits, poisoned):
    """Products are code * x * 2**-(26 + bits) (x scaled up by a power of two): activations far past LLMs' stay
    exact."""
    qweight, scales, zeros = _weights(16, 256, 32, False, bits)
    x = torch.randn(1, 256, generator=_gen("large")) * 3e4
    slots = torch.tensor([1e5, -1e5, 6e4, -6e4, 1e-30, -1e-30, 0.0, -0.0])[: 32 // bits]
    x[0, 0:4 * len(slots):4] = slots  # the code slots of word 0
    want = ops.int_linear(x, qweight, scales, zeros, None, None, bits, 32)
    got = _gemv(x, qweight, scales, zeros, None, 32, bits)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * want.abs().max().item())


@pytest.mark.parametrize("rows,k,group_size,bits,ok", [
    (1, 4096, 128, 4, True), (4, 4096, -1, 4, True), (5, 4096, 128, 4, False), (0, 4096, 128, 4, False),
    (1, 4112, 16, 4, False),  # K not in blocks of 32
    (1, 4096, 16, 4, False),  # a group smaller than a thread's 4 words
    (1, 4160, 96, 4, False),  # 96 does not divide 4160
    (1, 4112, -1, 8, True), (1, 4096, 16, 8, True), (1, 4104, -1, 8, False),  # INT8: blocks of 16 columns
    (1, 4096, 128, 2, False),  # 2-bit codes: no GEMV
])
def test_supported(rows, k, group_size, bits, ok):
    assert int_gemv_supported(rows, k, group_size, bits) is ok


def test_interleave_refuses_partial_blocks():
    with pytest.raises(ValueError, match="divisible by 16"):
        interleave_codes(torch.zeros(4, 6, dtype=torch.int32), 8)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("n,k,bits", [(6144, 4096, 4), (4096, 14336, 4), (1000, 4128, 4), (6144, 4096, 8),
                                      (4096, 14336, 8), (1000, 4112, 8)])
@pytest.mark.parametrize("rows", [1, 2, 4])
def test_gemv_on_gpu(n, k, bits, rows):
    group = (32 if k % 128 else 128) if bits == 4 else -1
    qweight, scales, zeros = _weights(n, k, group, False, bits, "cuda")
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    scales, zeros = scales.bfloat16(), zeros.bfloat16()
    want = ops.int_linear(x, qweight, scales, zeros, None, None, bits, group)
    for block_n, num_warps in ((8, 4), (4, 2)):
        got = _gemv(x, qweight, scales, zeros, None, group, bits, block_n, num_warps)
        torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=1e-2 * want.float().abs().max().item())


@pytest.mark.parametrize("n,bits,rows,knobs", [(4096, 4, 1, (16, 4)), (28672, 4, 1, (8, 2)), (4096, 4, 2, (8, 4)),
                                              (4096, 4, 4, (4, 4)), (28672, 4, 3, (4, 2)), (4096, 8, 4, (8, 4))])
def test_knobs_shrink_with_rows(n, bits, rows, knobs):
    """INT4 programs take fewer rows of W as x's rows grow (past 16 of W times x's ptxas spills)."""
    assert knobs_for(n, bits, rows) == knobs
