"""Quantized canonical ops (fp8_linear, int_linear) and the formats in kernels/quant_format.py.

Every reference is compared with an explicit dequantize-then-matmul written here from the format's
definition (unpacking bit by bit, not through quant_format), so a wrong packing or group mapping fails.
"""

from __future__ import annotations

import zlib

import pytest
import torch

import autodeploy.kernels  # noqa: F401
from autodeploy.kernels.gated_act import ACTIVATIONS
from autodeploy.errors import QuantizationError
from autodeploy.kernels.quant_format import (
    FP8_MAX,
    dequantize_fp8,
    dequantize_int,
    pack_int,
    quantize_fp8,
    quantize_int,
    unpack_int,
)

ops = torch.ops.autodeploy


def seeded(*key) -> torch.Generator:
    """A generator seeded from the test's parameters, the same in every process (unlike hash())."""
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def explicit_dequantize(qweight, scales, zeros, g_idx, bits, group_size, k):
    """w[n, k] = (code - zero) * scale, the code read from word k*bits//32 at bit (k % (32/bits))*bits."""
    n = qweight.shape[0]
    words = qweight.to(torch.int64) & 0xFFFFFFFF
    w = torch.empty(n, k)
    per_word = 32 // bits
    for col in range(k):
        code = (words[:, col // per_word] >> ((col % per_word) * bits)) & (2**bits - 1)
        g = int(g_idx[col]) if g_idx is not None else (0 if group_size == -1 else col // group_size)
        zero = zeros[:, g].float() if zeros is not None else 2 ** (bits - 1)
        w[:, col] = (code.float() - zero) * scales[:, g].float()
    return w


@pytest.mark.parametrize("bits", [4, 8])
def test_pack_unpack_roundtrip_and_layout(bits):
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, (5, 24 if bits == 8 else 40), generator=g, dtype=torch.int32)
    packed = pack_int(codes, bits)
    assert packed.dtype == torch.int32 and packed.shape == (5, codes.shape[1] * bits // 32)
    torch.testing.assert_close(unpack_int(packed, bits, codes.shape[1]), codes)
    # column 1's code sits right above column 0's (low bits first)
    low = (packed[:, 0].to(torch.int64) & 0xFFFFFFFF)
    torch.testing.assert_close(low & (2**bits - 1), codes[:, 0].to(torch.int64))
    torch.testing.assert_close((low >> bits) & (2**bits - 1), codes[:, 1].to(torch.int64))


@pytest.mark.parametrize("per_channel", [False, True])
def test_quantize_fp8_error_and_range(per_channel):
    w = torch.randn(7, 33) * torch.linspace(0.1, 10, 7)[:, None]
    q, scale = quantize_fp8(w, per_channel)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == ((7,) if per_channel else ())
    assert q.float().abs().max() <= FP8_MAX
    back = dequantize_fp8(q, scale)
    # e4m3 has 3 mantissa bits: relative error <= 2**-4 for normal values
    rel = ((back - w).abs() / w.abs().clamp(min=1e-3)).masked_fill(w.abs() < (scale.max() * 2**-6), 0)
    assert rel.max() <= 2**-4 + 1e-6


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
@pytest.mark.parametrize("symmetric", [True, False])
def test_quantize_int_error_bound(bits, group_size, symmetric):
    w = torch.randn(9, 256)
    qweight, scales, zeros = quantize_int(w, bits, group_size, symmetric)
    assert (zeros is None) == symmetric
    back = dequantize_int(qweight, scales, zeros, None, bits, group_size, 256)
    torch.testing.assert_close(back, explicit_dequantize(qweight, scales, zeros, None, bits, group_size, 256))
    g = torch.arange(256) // (256 if group_size == -1 else group_size)
    assert ((back - w).abs() <= scales.float()[:, g] * 0.5 + 1e-6).all()  # round-to-nearest: half a step


def test_quantize_int_bad_group_and_bits():
    with pytest.raises(QuantizationError, match="does not divide"):
        quantize_int(torch.randn(4, 96), 4, 64, True)
    with pytest.raises(QuantizationError, match="not supported"):
        quantize_int(torch.randn(4, 96), 3, 32, True)
    with pytest.raises(QuantizationError, match="multiple of 8"):
        quantize_int(torch.randn(4, 36), 4, -1, True)


# (rows, N, K): odd N, several K, leading batch dims exercised via reshape in the test
LINEAR_SHAPES = [(1, 7, 128), (5, 33, 256), (3, 65, 384)]


@pytest.mark.parametrize("shape", LINEAR_SHAPES, ids=str)
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
@pytest.mark.parametrize("symmetric", [True, False])
def test_int_linear_equals_dequantize_then_matmul(shape, bits, group_size, symmetric):
    m, n, k = shape
    g = seeded(shape, bits, group_size, symmetric)
    w = torch.randn(n, k, generator=g)
    x = torch.randn(2, m, k, generator=g)
    bias = torch.randn(n, generator=g)
    qweight, scales, zeros = quantize_int(w, bits, group_size, symmetric)
    want = x @ explicit_dequantize(qweight, scales, zeros, None, bits, group_size, k).t() + bias
    got = ops.int_linear(x, qweight, scales, zeros, None, bias, bits, group_size)
    assert got.shape == (2, m, n)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("bits", [4, 8])
def test_int_linear_act_order_g_idx(bits):
    """GPTQ act-order: column k uses group g_idx[k], a permutation of the plain grouping."""
    n, k, group_size = 11, 256, 32
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 2**bits, (n, k), generator=g, dtype=torch.int32)
    qweight = pack_int(codes, bits)
    scales = torch.rand(n, k // group_size, generator=g).half() / 10
    zeros = torch.randint(0, 2**bits, (n, k // group_size), generator=g).half()
    g_idx = (torch.arange(k) // group_size)[torch.randperm(k, generator=g)].to(torch.int32)
    x = torch.randn(3, k, generator=g).half()
    want = (x.float() @ explicit_dequantize(qweight, scales, zeros, g_idx, bits, group_size, k).t()).half()
    got = ops.int_linear(x, qweight, scales, zeros, g_idx, None, bits, group_size)
    assert got.dtype == torch.float16
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)
    plain = ops.int_linear(x, qweight, scales, zeros, None, None, bits, group_size)
    assert not torch.allclose(plain, got)  # the permutation matters, so the test can fail


def test_int_linear_bad_layout_is_an_error():
    qweight, scales, _ = quantize_int(torch.randn(4, 128), 4, 32, True)
    with pytest.raises(QuantizationError, match="does not divide"):
        ops.int_linear(torch.randn(1, 128), qweight, scales, None, None, None, 4, 48)
    with pytest.raises(QuantizationError, match="words per row"):
        ops.int_linear(torch.randn(1, 64), qweight, scales, None, None, None, 4, 32)


GROUP = 32  # act_quant="group": columns per activation scale (LINEAR_SHAPES' K: divided, and not)


def explicit_fp8_linear(x, w_fp8, w_scale, sx, bias=None):
    qx = (x.float() / sx).clamp(-448, 448).to(torch.float8_e4m3fn).float()
    w = w_fp8.float() * (w_scale[:, None] if w_scale.dim() else w_scale)
    y = (qx * sx) @ w.t()
    return y + bias if bias is not None else y


@pytest.mark.parametrize("shape", LINEAR_SHAPES, ids=str)
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("act_quant", ["token", "tensor", "static", "group"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_fp8_linear_equals_dequantize_then_matmul(shape, per_channel, act_quant, with_bias):
    m, n, k = shape
    g = seeded(shape, per_channel, act_quant, with_bias)
    w_fp8, w_scale = quantize_fp8(torch.randn(n, k, generator=g), per_channel)
    x = torch.randn(m, k, generator=g) * torch.linspace(0.1, 4, m)[:, None] * torch.linspace(0.05, 3, k)
    bias = torch.randn(n, generator=g) if with_bias else None
    input_scale = torch.tensor(0.05) if act_quant == "static" else None
    if act_quant == "token":
        sx = x.abs().amax(-1, keepdim=True) / 448
    elif act_quant == "tensor":
        sx = x.abs().amax() / 448
    elif act_quant == "group":  # per row and span of GROUP columns, the last span short where GROUP does not divide k
        sx = torch.empty(m, k)
        for start in range(0, k, GROUP):
            sx[:, start:start + GROUP] = x[:, start:start + GROUP].abs().amax(-1, keepdim=True) / 448
    else:
        sx = input_scale
    want = explicit_fp8_linear(x, w_fp8, w_scale, sx, bias)
    got = ops.fp8_linear(x, w_fp8, w_scale, input_scale, bias, "tensor" if act_quant == "static" else act_quant, GROUP)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    # and within e4m3's rounding of x from the unquantized product: each x value moves by at most 2**-4
    # of itself (normal range) or half the smallest subnormal, 2**-10 * sx
    w = dequantize_fp8(w_fp8, w_scale)
    exact = x @ w.t() + (bias if bias is not None else 0)
    bound = (x.abs() @ w.abs().t()) * 2**-4 + (torch.as_tensor(sx).expand(m, k) * 2**-10) @ w.abs().t()
    assert ((got - exact).abs() <= bound + 1e-4).all()


def test_fp8_group_scales_follow_the_columns():
    """Columns of very different size: a per-row scale set by the large ones flushes the small ones to zero,
    one scale per group of columns keeps them (the weights read only the small columns, so y shows them);
    a group as wide as the row is the per-token scale."""
    g = torch.Generator().manual_seed(5)
    weight = torch.randn(24, 96, generator=g)
    weight[:, 32:] = 0
    w_fp8, w_scale = quantize_fp8(weight, True)
    x = torch.randn(4, 96, generator=g) * torch.cat([torch.full((32,), 1e-4), torch.full((64,), 100.0)])
    exact = x @ dequantize_fp8(w_fp8, w_scale).t()
    per_token, grouped = (ops.fp8_linear(x, w_fp8, w_scale, None, None, act, 32) for act in ("token", "group"))
    assert (per_token - exact).abs().max() > 0.5 * exact.abs().max()
    torch.testing.assert_close(grouped, exact, rtol=0, atol=0.07 * exact.abs().max().item())
    assert torch.equal(ops.fp8_linear(x, w_fp8, w_scale, None, None, "group", 128),
                       ops.fp8_linear(x, w_fp8, w_scale, None, None, "token"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fp8_linear_keeps_half_dtype_and_handles_zero_rows(dtype):
    w_fp8, w_scale = quantize_fp8(torch.randn(16, 64), True)
    x = torch.randn(2, 3, 64).to(dtype)
    x[0, 1] = 0
    got = ops.fp8_linear(x, w_fp8, w_scale)
    assert got.dtype == dtype and got.shape == (2, 3, 16) and torch.isfinite(got).all()
    assert (got[0, 1] == 0).all()


def test_quantized_linears_export_with_fake_impls():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q = quantize_int(torch.randn(24, 64), 4, 32, False)
            self.f = quantize_fp8(torch.randn(24, 64), False)

        def forward(self, x):
            a = ops.int_linear(x, self.q[0], self.q[1], self.q[2], None, None, 4, 32)
            return a + ops.fp8_linear(x, self.f[0], self.f[1])

    net = Net()
    x = torch.randn(2, 5, 64)
    ep = torch.export.export(net, (x,))
    out = ep.module()(x)
    torch.testing.assert_close(out, net(x))
    with torch.device("meta"):
        assert net(torch.empty(3, 64)).shape == (3, 24)


def _route(g, tokens, experts, top_k):
    weights, ids = torch.randn(tokens, experts, generator=g).softmax(-1).topk(top_k, dim=-1)
    return ids, weights / weights.sum(-1, keepdim=True)


def _quantize_experts(w, quantize):
    """Stack quantize(w[e]) over experts: [(t0_e...), (t1_e...)] -> tuple of stacked tensors (None kept)."""
    parts = [quantize(we) for we in w]
    return tuple(None if p[0] is None else torch.stack(p) for p in zip(*parts))


MOE_SHAPES = [(1, 64, 32, 2, 1), (7, 64, 96, 4, 2), (13, 128, 64, 8, 2)]  # tokens, hidden, inter, experts, top-k


@pytest.mark.parametrize("shape", MOE_SHAPES, ids=str)
@pytest.mark.parametrize("bits,group_size,symmetric", [(4, 32, True), (4, 32, False), (8, -1, True), (8, 32, False)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_int_moe_equals_dequantize_then_moe(shape, bits, group_size, symmetric, with_bias):
    t, h, i, e, top_k = shape
    g = seeded(shape, bits, group_size, symmetric)
    x = torch.randn(t, h, generator=g)
    w1, w2 = torch.randn(e, 2 * i, h, generator=g) / h**0.5, torch.randn(e, h, i, generator=g) / i**0.5
    b1, b2 = (torch.randn(e, 2 * i, generator=g), torch.randn(e, h, generator=g)) if with_bias else (None, None)
    ids, weights = _route(g, t, e, top_k)
    q1 = _quantize_experts(w1, lambda w: quantize_int(w, bits, group_size, symmetric))
    q2 = _quantize_experts(w2, lambda w: quantize_int(w, bits, group_size, symmetric))
    deq1 = torch.stack([explicit_dequantize(q1[0][n], q1[1][n], None if symmetric else q1[2][n], None, bits,
                                            group_size, h) for n in range(e)])
    deq2 = torch.stack([explicit_dequantize(q2[0][n], q2[1][n], None if symmetric else q2[2][n], None, bits,
                                            group_size, i) for n in range(e)])
    want = ops.moe(x, ids, weights, deq1, deq2, "silu", b1, b2)
    got = ops.int_moe(x, ids, weights, *q1, *q2, "silu", bits, group_size, b1, b2)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", MOE_SHAPES, ids=str)
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
def test_fp8_moe_equals_dequantize_then_moe(shape, per_channel, activation):
    t, h, i, e, top_k = shape
    g = seeded(shape, per_channel, activation)
    x = torch.randn(2, t, h, generator=g)
    w1, w2 = torch.randn(e, 2 * i, h, generator=g) / h**0.5, torch.randn(e, h, i, generator=g) / i**0.5
    ids, weights = _route(g, 2 * t, e, top_k)
    ids, weights = ids.reshape(2, t, top_k), weights.reshape(2, t, top_k)
    (q1, s1), (q2, s2) = (_quantize_experts(w, lambda we: quantize_fp8(we, per_channel)) for w in (w1, w2))
    deq1 = torch.stack([dequantize_fp8(q1[n], s1[n]) for n in range(e)])
    deq2 = torch.stack([dequantize_fp8(q2[n], s2[n]) for n in range(e)])

    def quantize_tokens(a):  # the per-token e4m3 rounding fp8_moe applies before each projection
        s = a.abs().amax(-1, keepdim=True).clamp(min=1e-12) / 448
        return (a / s).clamp(-448, 448).to(torch.float8_e4m3fn).float() * s

    want = torch.zeros_like(x)
    act = ACTIVATIONS[activation]
    for tok in range(2 * t):
        for slot in range(top_k):
            n = int(ids.reshape(-1, top_k)[tok, slot])
            gate, up = (quantize_tokens(x.reshape(-1, h)[tok]) @ deq1[n].t()).chunk(2)
            y = quantize_tokens(act(gate) * up) @ deq2[n].t()
            want.reshape(-1, h)[tok] += weights.reshape(-1, top_k)[tok, slot] * y
    got = ops.fp8_moe(x, ids, weights, q1, s1, q2, s2, activation)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    unquantized_activations = ops.moe(x, ids, weights, deq1, deq2, activation)
    assert (got - unquantized_activations).abs().max() <= 0.1 * unquantized_activations.abs().max()


def test_quantized_moe_fake_impls_export():
    e, h, i = 4, 64, 32
    q1 = _quantize_experts(torch.randn(e, 2 * i, h), lambda w: quantize_int(w, 4, 32, True))
    q2 = _quantize_experts(torch.randn(e, h, i), lambda w: quantize_int(w, 4, 32, True))

    class Net(torch.nn.Module):
        def forward(self, x, ids, weights):
            return ops.int_moe(x, ids, weights, *q1, *q2, "silu", 4, 32)

    args = (torch.randn(3, h), torch.tensor([[0, 1], [2, 3], [1, 2]]), torch.full((3, 2), 0.5))
    ep = torch.export.export(Net(), args)
    torch.testing.assert_close(ep.module()(*args), Net()(*args))
