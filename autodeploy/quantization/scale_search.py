"""Calibration-free INT4/INT8 scales: per group, the clipping ratio that minimises the weight's squared error.

Round-to-nearest maps each group's extreme weights exactly and spends the few codes of 4 bits on a
range one outlier may stretch; clipping the range a little (scale from `ratio * amax`) rounds the bulk
of the group more finely at the cost of the clipped outliers. Trying a grid of ratios per group and
keeping the one with the least squared error needs no data (unlike GPTQ/AWQ calibration) and costs a
few passes over the weight while it loads. Output: quantize_int's layout (kernels/quant_format.py).
"""

from __future__ import annotations

import torch

from autodeploy.kernels.quant_format import check_bits, groups_of, pack_int

DEFAULT_RATIOS = tuple(1.0 - 0.05 * i for i in range(11))  # 1.0 .. 0.5


def _range(wg: torch.Tensor, bits: int, symmetric: bool, ratio: float | torch.Tensor):
    """(scale, zero) per group [N, G] for the range clipped to `ratio` of the group's extremes."""
    lo, hi = wg.amin(-1) * ratio, wg.amax(-1) * ratio
    if symmetric:
        scale = (torch.maximum(hi, -lo) / (2 ** (bits - 1) - 1)).clamp(min=1e-10)
        return scale, torch.full_like(scale, 2 ** (bits - 1))
    lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    scale = ((hi - lo) / (2**bits - 1)).clamp(min=1e-10)
    return scale, (-lo / scale).round().clamp(0, 2**bits - 1)


def _codes(wg: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    return (wg / scale[..., None]).round().add(zero[..., None]).clamp(0, 2**bits - 1)


@torch.no_grad()
def quantize_int_mse(w: torch.Tensor, bits: int, group_size: int, symmetric: bool,
                     ratios: tuple[float, ...] = DEFAULT_RATIOS) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """w [N, K] -> (qweight int32 [N, K*bits/32], scales [N, G] float32, zeros [N, G] | None), each group's
    scales from the ratio of `ratios` with the least squared dequantization error."""
    n, k = w.shape
    check_bits(bits, k)
    wg = w.float().reshape(n, groups_of(k, group_size), -1)
    best_err = torch.full(wg.shape[:2], float("inf"), device=w.device)
    best_ratio = torch.ones(wg.shape[:2], device=w.device)
    for ratio in ratios:
        scale, zero = _range(wg, bits, symmetric, ratio)
        err = ((_codes(wg, scale, zero, bits) - zero[..., None]) * scale[..., None] - wg).square().sum(-1)
        better = err < best_err
        best_err, best_ratio = torch.where(better, err, best_err), torch.where(better, ratio, best_ratio)
    scale, zero = _range(wg, bits, symmetric, best_ratio)
    qweight = pack_int(_codes(wg, scale, zero, bits).reshape(n, k).to(torch.int32), bits)
    return qweight, scale, None if symmetric else zero
