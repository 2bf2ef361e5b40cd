"""The INT4 GEMV on tensor cores (kernels/triton_int4_mma_gemv.py) against the int_linear reference.

On the CPU the interpreter forms each MMA from the lanes' fragments with plain tensor ops (the PTX layouts of
mma.m16n8k16), so these tests check which code and which column of x every lane hands the MMA, the 128 taken off
by x's column sums, the groups' coefficients, K split over warps and the stores; the GPU tests check the
instructions. bf16 x (the kernel's only dtype); outputs poisoned with NaN so a row or column the kernel forgets
shows; shapes with N not a multiple of the tiles, K units left over by the split, one group per row."""

from __future__ import annotations

import zlib

import pytest
import torch

import autodeploy.kernels  # noqa: F401
from autodeploy.kernels.quant_format import quantize_int
from autodeploy.kernels.triton_int4_mma_gemv import int4_mma_gemv, mma_gemv_supported
from autodeploy.kernels.triton_int_gemv import gemv_coefficients, interleave_codes

ops = torch.ops.autodeploy


def _gen(*key):
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def _weights(n, k, group_size, symmetric, device="cpu"):
    g = _gen(n, k, group_size, symmetric)
    qweight, scales, zeros = quantize_int(torch.randn(n, k, generator=g) / k**0.5, 4, group_size, symmetric)
    if zeros is not None:  # fractional, as the scale search leaves them
        zeros = (zeros + torch.rand(zeros.shape, generator=g) - 0.5).clamp(0, 15)
    return [None if t is None else t.to(device) for t in (qweight, scales, zeros)]


def _check(n, k, group_size, rows, symmetric, knobs=(), bias=True, device="cpu", dims=()):
    qweight, scales, zeros = _weights(n, k, group_size, symmetric, device)
    b = torch.randn(n, generator=_gen("bias", n)).to(device) if bias else None
    x = torch.randn(*dims, rows, k, generator=_gen("x", n, k, rows)).to(device, torch.bfloat16)
    want = ops.int_linear(x.float(), qweight, scales, zeros, None, b, 4, group_size)
    got = int4_mma_gemv(x, interleave_codes(qweight, 4), gemv_coefficients(scales, zeros, 4), b, group_size, *knobs)
    assert got.shape == want.shape and got.dtype == torch.bfloat16
    # the bf16 output's rounding: at most a unit of its last place at the largest output
    torch.testing.assert_close(got.float(), want, rtol=0, atol=2**-7 * want.abs().max().item())


@pytest.fixture
def poisoned(monkeypatch):
    empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: empty(*a, **k).fill_(float("nan")))


@pytest.mark.parametrize("n,k,group_size,rows,symmetric,knobs", [
    (40, 256, 128, 1, False, (2, 2, 1)),  # two tiles, the last partly past N
    (37, 512, 64, 3, True, (2, 2, 2)),  # groups of one chunk, 2 units a step
    (16, 128, -1, 8, False, (1, 1, 1)),  # one group per row, x's rows fill the MMA's columns
    (70, 384, 128, 5, False, (1, 2, 1)),  # 3 units over 2 warps: one warp's second unit is empty
    (33, 640, 128, 2, True, (1, 4, 2)),  # 5 units over 4 warps, 2 a step
    (24, 1280, 128, 1, False, (1, 2, 4)),  # 10 units over 2 warps, 4 a step: the last step partly empty
])
def test_matches_reference(n, k, group_size, rows, symmetric, knobs, poisoned):
    _check(n, k, group_size, rows, symmetric, knobs)


def test_default_knobs_and_leading_dims(poisoned):
    _check(24, 256, 128, 1, False, dims=(1,), bias=False)


@pytest.mark.parametrize("rows,k,group_size,dtype,ok", [
    (1, 4096, 128, torch.bfloat16, True), (8, 4096, -1, torch.bfloat16, True), (9, 4096, 128, torch.bfloat16, False),
    (1, 4096, 128, torch.float16, False), (1, 4096, 32, torch.bfloat16, False), (1, 4160, -1, torch.bfloat16, False),
    (1, 4160, 64, torch.bfloat16, True), (0, 4096, 128, torch.bfloat16, False),
])
def test_supported(rows, k, group_size, dtype, ok):
    assert mma_gemv_supported(rows, k, group_size, dtype) is ok


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("n,k,group_size", [(6144, 4096, 128), (4096, 14336, 128), (28672, 4096, 128),
                                            (1000, 4160, 64), (4096, 4096, -1)])
@pytest.mark.parametrize("rows", [1, 2, 5, 8])
def test_matches_reference_on_gpu(n, k, group_size, rows):
    for knobs in ((), (1, 1, 1), (2, 2, 2), (1, 4, 1), (1, 8, 4), (2, 4, 8)):
        _check(n, k, group_size, rows, False, knobs, device="cuda")
