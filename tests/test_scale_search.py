"""autodeploy/quantization/scale_search.py: searched scales against round-to-nearest (quantize_int / quantize_fp8).

Each search starts at round-to-nearest and keeps only what lowers the squared weight error, so on any
weight it must never lose to RTN, must equal RTN with the search switched off, and must find a grid
the weights already lie on exactly.
"""

import pytest
import torch

import autodeploy.quantization.scale_search as scale_search
from autodeploy.kernels.quant_format import dequantize_fp8, dequantize_int, quantize_fp8, quantize_int
from autodeploy.quantization.scale_search import quantize_fp8_search, quantize_int_search


def _error(q, w, bits, group_size):
    qweight, scales, zeros = q
    return (dequantize_int(qweight, scales, zeros, None, bits, group_size, w.shape[1]) - w).square().sum(-1)


def _weight(seed, n=24, k=128):
    """Heavy-tailed rows (Student-t), as LLM weights are: the case where RTN's range is a poor grid."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) / torch.rand(n, k, generator=g).add(0.05).sqrt()


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits,group_size", [(4, 32), (4, -1), (8, 64)])
def test_no_search_is_round_to_nearest_and_the_search_never_loses(symmetric, bits, group_size):
    w = _weight(bits + group_size)
    rtn = quantize_int(w, bits, group_size, symmetric)
    same = quantize_int_search(w, bits, group_size, symmetric, ratios=(1.0,), steps=0)
    assert torch.equal(same[0], rtn[0]) and torch.allclose(same[1], rtn[1])
    assert (same[2] is None) == symmetric and (symmetric or torch.equal(same[2], rtn[2]))
    searched = _error(quantize_int_search(w, bits, group_size, symmetric), w, bits, group_size)
    rtn_error = _error(rtn, w, bits, group_size)
    assert (searched <= rtn_error * (1 + 1e-6)).all()
    if bits == 4 or not symmetric:  # and it gains, not just ties (8-bit ranges are rarely worth clipping)
        assert searched.sum() < (0.9 if bits == 4 else 0.97) * rtn_error.sum()


def test_asymmetric_fit_recovers_a_grid_the_weights_lie_on():
    """Weights already on a 4-bit affine grid per group (fractional zero point): RTN's integer zero and
    min/max range miss it, the least-squares fit lands on it exactly."""
    g = torch.Generator().manual_seed(3)
    codes = torch.randint(0, 16, (16, 4, 32), generator=g).float()
    codes[..., 0], codes[..., 1] = 0, 15  # every code range used, so the grid is unique
    scale = torch.rand(16, 4, 1, generator=g) * 0.1 + 0.01
    zero = torch.rand(16, 4, 1, generator=g) * 15  # the origin between codes
    w = ((codes - zero) * scale).reshape(16, 128)
    assert _error(quantize_int(w, 4, 32, False), w, 4, 32).max() > 1e-4
    assert _error(quantize_int_search(w, 4, 32, False), w, 4, 32).max() < 1e-9


def test_an_outlier_is_clipped_by_the_symmetric_search():
    w = torch.randn(8, 32, generator=torch.Generator().manual_seed(0))
    w[:, 0] = 6.0  # one outlier per group stretches round-to-nearest's range
    rtn, searched = quantize_int(w, 4, 32, True), quantize_int_search(w, 4, 32, True)
    assert (searched[1] <= rtn[1]).all() and (searched[1] < rtn[1]).sum() >= 4  # most groups clip
    assert _error(searched, w, 4, 32).sum() < 0.98 * _error(rtn, w, 4, 32).sum()


def test_chunked_rows_equal_one_pass(monkeypatch):
    w = _weight(5, n=37, k=64)
    whole_int, whole_fp8 = quantize_int_search(w, 4, 32, False), quantize_fp8_search(w)
    monkeypatch.setattr(scale_search, "_CHUNK_ELEMENTS", 64 * 5)  # 5 rows a chunk, the last one short
    for a, b in zip(quantize_int_search(w, 4, 32, False) + quantize_fp8_search(w), whole_int + whole_fp8):
        assert torch.equal(a.float(), b.float())


def test_fp8_search_is_rtn_at_factor_one_and_never_loses():
    w = _weight(7, n=40, k=96)
    rtn = quantize_fp8(w, per_channel=True)
    same = quantize_fp8_search(w, factors=(1.0,))
    assert torch.equal(same[0].float(), rtn[0].float()) and torch.equal(same[1], rtn[1])
    rtn_error = (dequantize_fp8(*rtn) - w).square().sum(-1)
    searched = (dequantize_fp8(*quantize_fp8_search(w)) - w).square().sum(-1)
    assert (searched <= rtn_error).all() and searched.sum() < 0.95 * rtn_error.sum()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_scales_are_what_the_codes_were_rounded_against(dtype):
    """Scales and zeros are stored in the weight's dtype; the codes must fit the stored values."""
    w = _weight(11, n=16, k=64).to(dtype)
    qweight, scales, zeros = quantize_int_search(w, 4, 32, False)
    assert scales.dtype == zeros.dtype == dtype
    wf = w.float()
    searched = _error((qweight, scales, zeros), wf, 4, 32)
    rtn = _error(quantize_int(w, 4, 32, False), wf, 4, 32)
    assert searched.sum() < rtn.sum()
