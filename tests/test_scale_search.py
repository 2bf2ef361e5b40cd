"""autodeploy/quantization/scale_search.py: MSE clipping search against round-to-nearest (quantize_int)."""

import pytest
import torch

from autodeploy.kernels.quant_format import dequantize_int, quantize_int
from autodeploy.quantization.scale_search import quantize_int_mse


def _error(q, w, bits, group_size):
    qweight, scales, zeros = q
    return (dequantize_int(qweight, scales, zeros, None, bits, group_size, w.shape[1]) - w).square().sum(-1)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits,group_size", [(4, 32), (4, -1), (8, 64)])
def test_ratio_one_is_round_to_nearest_and_the_search_never_loses(symmetric, bits, group_size):
    w = torch.randn(24, 128, generator=torch.Generator().manual_seed(bits + group_size))
    rtn = quantize_int(w, bits, group_size, symmetric)
    same = quantize_int_mse(w, bits, group_size, symmetric, ratios=(1.0,))
    assert torch.equal(same[0], rtn[0]) and torch.allclose(same[1], rtn[1])
    assert (same[2] is None) == symmetric and (symmetric or torch.equal(same[2], rtn[2]))
    searched = _error(quantize_int_mse(w, bits, group_size, symmetric), w, bits, group_size)
    assert (searched <= _error(rtn, w, bits, group_size) * (1 + 1e-6)).all()


def test_an_outlier_is_clipped():
    w = torch.randn(8, 32, generator=torch.Generator().manual_seed(0))
    w[:, 0] = 6.0  # one outlier per group stretches round-to-nearest's range
    rtn, searched = quantize_int(w, 4, 32, True), quantize_int_mse(w, 4, 32, True)
    assert (searched[1] <= rtn[1]).all() and (searched[1] < rtn[1]).sum() >= 4  # most groups clip
    assert _error(searched, w, 4, 32).sum() < 0.98 * _error(rtn, w, 4, 32).sum()
