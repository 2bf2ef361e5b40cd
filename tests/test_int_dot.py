"""The INT4 / INT8 tensor-core dot for decode batches (kernels/triton_int_dot.py) against the int_linear reference.

Canonical and re-packed (GEMV) words, both ways of loading them, the weight as either MMA operand; odd N and row
counts that do not fill a tile, K past one step, fractional zero points, outputs poisoned with NaN. float32 x in
the interpreter rounds the dequantized weight to float32 only, so it matches the reference to float32 rounding."""

from __future__ import annotations

import zlib

import pytest
import torch

import autodeploy.kernels  # noqa: F401
from autodeploy.kernels.quant_format import quantize_int
from autodeploy.kernels.triton_int_dot import int_dot, int_dot_supported
from autodeploy.kernels.triton_int_gemv import interleave_codes
from autodeploy.kernels.triton_split_k import split_counters

ops = torch.ops.autodeploy


def _gen(*key):
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def _weights(n, k, group_size, symmetric, bits, device="cpu"):
    g = _gen(n, k, group_size, symmetric, bits)
    qweight, scales, zeros = quantize_int(torch.randn(n, k, generator=g) / k**0.5, bits, group_size, symmetric)
    if zeros is not None:  # fractional, as the scale search leaves them
        zeros = (zeros + torch.rand(zeros.shape, generator=g) - 0.5).clamp(0, 2**bits - 1)
    return [None if t is None else t.to(device) for t in (qweight, scales, zeros)]


@pytest.fixture
def poisoned(monkeypatch):
    empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: empty(*a, **k).fill_(float("nan")))


@pytest.mark.parametrize("n,k,group_size,bits,symmetric", [
    (40, 256, 128, 4, False), (37, 96, 32, 4, True), (24, 320, -1, 4, False),
    (33, 272, -1, 8, True), (20, 192, 64, 8, False),
])
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("splat,swap,split_k", [(True, True, 1), (False, True, 2), (True, False, 1), (False, False, 3)])
def test_int_dot_matches_reference(n, k, group_size, bits, symmetric, interleaved, splat, swap, split_k, poisoned):
    qweight, scales, zeros = _weights(n, k, group_size, symmetric, bits)
    bias = torch.randn(n, generator=_gen("bias", n))
    x = torch.randn(19, k, generator=_gen("x", n, k))
    want = ops.int_linear(x, qweight, scales, zeros, None, bias, bits, group_size)
    words = interleave_codes(qweight, bits) if interleaved else qweight
    got = int_dot(x, words, scales, zeros, bias, bits, group_size, interleaved, block_m=16, block_n=16, block_k=64,
                  num_warps=1, num_stages=1, swap=swap, splat=splat, split_k=split_k)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * want.abs().max().item())
    if split_k > 1:  # the last split of each tile zeroed its arrival counter for the next call
        assert not split_counters(x.device).any()


def test_int_dot_split_with_an_empty_last_split(poisoned):
    """5 K steps over 4 splits of 2 steps: the last split has no step and adds zeros (and reads a real group)."""
    qweight, scales, zeros = _weights(24, 160, 32, False, 4)
    x = torch.randn(7, 160, generator=_gen("x-empty-split"))
    want = ops.int_linear(x, qweight, scales, zeros, None, None, 4, 32)
    got = int_dot(x, interleave_codes(qweight, 4), scales, zeros, None, 4, 32, True, block_m=16, block_n=16,
                  block_k=32, num_warps=1, num_stages=1, split_k=4)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * want.abs().max().item())


def test_int_dot_bf16_and_batched_shape(poisoned):
    qweight, scales, zeros = _weights(24, 256, 128, False, 4)
    scales, zeros = scales.bfloat16(), zeros.bfloat16()
    x = torch.randn(3, 6, 256, generator=_gen("x16")).bfloat16()
    want = ops.int_linear(x, qweight, scales, zeros, None, None, 4, 128)
    got = int_dot(x, interleave_codes(qweight, 4), scales, zeros, None, 4, 128, True, block_m=16, block_n=16,
                  block_k=128, num_warps=1, num_stages=1)
    assert got.shape == want.shape and got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=1e-2 * want.float().abs().max().item())


@pytest.mark.parametrize("k,bits,group_size,ok", [
    (4096, 4, 128, True), (4096, 4, -1, True), (4096, 4, 32, True), (4096, 8, -1, True), (4112, 8, -1, True),
    (4112, 4, -1, False),  # INT4 K not in blocks of 32
    (4096, 4, 16, False),  # a K step of 16 columns is less than a block of 4 INT4 words
    (4160, 4, 96, False),  # a group that is no power of two
    (4096, 2, 128, False),
])
def test_supported(k, bits, group_size, ok):
    assert int_dot_supported(k, bits, group_size) is ok


def test_refuses_unsupported_shapes():
    x = torch.zeros(5, 4112)
    with pytest.raises(ValueError, match="int_dot does not take"):
        int_dot(x, torch.zeros(8, 514, dtype=torch.int32), torch.ones(8, 1), None, None, 4, -1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("n,k,bits,group", [(6144, 4096, 4, 128), (4096, 14336, 4, 128), (1000, 4128, 4, 32),
                                            (6144, 4096, 8, -1), (1000, 4112, 8, -1)])
@pytest.mark.parametrize("rows", [5, 64, 200])
def test_int_dot_on_gpu(n, k, bits, group, rows):
    qweight, scales, zeros = _weights(n, k, group, False, bits, "cuda")
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    scales, zeros = scales.bfloat16(), zeros.bfloat16()
    want = ops.int_linear(x, qweight, scales, zeros, None, None, bits, group)
    for interleaved, split_k in ((False, 1), (True, 1), (True, 4)):
        got = int_dot(x, interleave_codes(qweight, bits) if interleaved else qweight, scales, zeros, None, bits, group,
                      interleaved, split_k=split_k)
        torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=1e-2 * want.float().abs().max().item())
