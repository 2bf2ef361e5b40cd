"""Calibration-free scale search: weight scales (and zero points) fitted to the weight, no data needed.

Round-to-nearest takes a group's range from its extremes; that is rarely the grid that represents
the group best. Each search here starts from round-to-nearest and only keeps what lowers the
weight's squared error, so it is never worse than RTN on that measure, and costs a few passes over
one tensor while it loads (unlike GPTQ/AWQ, which need calibration activations):
- INT, asymmetric (the default for int4 / int8): alternating least squares. With the codes fixed,
  the best (scale, offset) of a group is a linear fit of the weights on the codes; with those fixed,
  the best codes are round-to-nearest. Each step lowers the error. The zero point stays fractional
  (the int ops read zeros in code units as floats), which the fit needs.
- INT, symmetric: per group the clipping ratio of the range (1.0 .. 0.5) with the least error.
- FP8 (per output channel): e4m3 is a float grid, so scaling a row by a factor inside one octave
  moves every value against the grid; per row the factor of `FP8_FACTORS` with the least error.
Rows are processed in chunks, so the temporaries stay a fraction of one tensor (the memory bound
of online quantization). Output layouts: quantize_int's and quantize_fp8's (kernels/quant_format.py).
"""

from __future__ import annotations

import torch

from autodeploy.kernels.quant_format import FP8_DTYPE, FP8_MAX, check_bits, groups_of, pack_int

CLIP_RATIOS = tuple(1.0 - 0.05 * i for i in range(11))  # symmetric: 1.0 .. 0.5 of the group's range
FIT_STEPS = 5  # asymmetric: alternating least-squares steps (the error settles within a few)
FP8_FACTORS = tuple(1.0 + i / 16 for i in range(16))  # fp8: one octave of per-row scale factors
# Elements per chunk of rows: about 1 MiB of float32 per temporary on the CPU; 16 MiB on a GPU, where the small
# chunks' kernel launches dominated (H200, one 8B gate_up: int4 1,467 -> 92 ms, fp8 1,129 -> 77 ms).
_CHUNK_ELEMENTS = 1 << 18
_CUDA_CHUNK_ELEMENTS = 1 << 22
_MIN_SCALE = 1e-12


def _row_chunks(n: int, k: int, device: torch.device) -> list[slice]:
    step = max(1, (_CUDA_CHUNK_ELEMENTS if device.type == "cuda" else _CHUNK_ELEMENTS) // k)
    return [slice(start, min(start + step, n)) for start in range(0, n, step)]


def _codes(wg: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, top: int) -> torch.Tensor:
    return (wg / scale[..., None] + zero[..., None]).round_().clamp_(0, top)


def _error(wg: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, top: int) -> torch.Tensor:
    """Squared dequantization error per group [N, G]."""
    return ((_codes(wg, scale, zero, top) - zero[..., None]) * scale[..., None] - wg).square_().sum(-1)


def _min_max(wg: torch.Tensor, bits: int, symmetric: bool, ratio: float | torch.Tensor = 1.0):
    """(scale, zero) per group of the range [min, max] * ratio (quantize_int's round-to-nearest at 1.0)."""
    lo, hi = wg.amin(-1) * ratio, wg.amax(-1) * ratio
    if symmetric:
        scale = (torch.maximum(hi, -lo) / (2 ** (bits - 1) - 1)).clamp(min=_MIN_SCALE)
        return scale, torch.full_like(scale, 2 ** (bits - 1))
    lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    scale = ((hi - lo) / (2**bits - 1)).clamp(min=_MIN_SCALE)
    return scale, (-lo / scale).round().clamp(0, 2**bits - 1)


def _clip_search(wg: torch.Tensor, bits: int, ratios: tuple[float, ...]):
    """Symmetric: per group the clipping ratio with the least error."""
    top = 2**bits - 1
    best_err = torch.full(wg.shape[:2], float("inf"), device=wg.device)
    best_ratio = torch.ones(wg.shape[:2], device=wg.device)
    for ratio in ratios:
        err = _error(wg, *_min_max(wg, bits, True, ratio), top)
        better = err < best_err
        best_err, best_ratio = torch.where(better, err, best_err), torch.where(better, ratio, best_ratio)
    return _min_max(wg, bits, True, best_ratio)


def _least_squares_fit(wg: torch.Tensor, bits: int, steps: int):
    """Asymmetric: alternate optimal codes and the least-squares (scale, offset) of each group."""
    top = 2**bits - 1
    scale, zero = _min_max(wg, bits, False)
    best_err = _error(wg, scale, zero, top)
    w_mean = wg.mean(-1)
    for _ in range(steps):
        codes = _codes(wg, scale, zero, top)
        c_mean = codes.mean(-1)
        codes.sub_(c_mean[..., None])
        fit = (codes * (wg - w_mean[..., None])).sum(-1) / codes.square().sum(-1).clamp(min=1e-20)
        del codes
        usable = fit > _MIN_SCALE  # a group whose codes are all equal has no slope to fit
        new_scale = torch.where(usable, fit, scale)
        new_zero = torch.where(usable, c_mean - w_mean / new_scale, zero)
        err = _error(wg, new_scale, new_zero, top)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        scale, zero = torch.where(better, new_scale, scale), torch.where(better, new_zero, zero)
    return scale, zero


@torch.no_grad()
def quantize_int_search(w: torch.Tensor, bits: int, group_size: int, symmetric: bool,
                        ratios: tuple[float, ...] = CLIP_RATIOS, steps: int = FIT_STEPS,
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """w [N, K] -> (qweight int32 [N, K*bits/32], scales [N, G], zeros [N, G] | None) as quantize_int
    returns them (scales and zeros in w's dtype, codes rounded against them as stored), each group's
    scale (and zero) searched as the module docstring says."""
    n, k = w.shape
    check_bits(bits, k)
    g = groups_of(k, group_size)
    out_dtype = w.dtype if w.dtype.is_floating_point and w.element_size() >= 2 else torch.float32
    top = 2**bits - 1
    qweight = torch.empty(n, k * bits // 32, dtype=torch.int32, device=w.device)
    scales = torch.empty(n, g, dtype=out_dtype, device=w.device)
    zeros = torch.empty(n, g, dtype=out_dtype, device=w.device)
    for rows in _row_chunks(n, k, w.device):
        wg = w[rows].float().reshape(-1, g, k // g)
        scale, zero = _clip_search(wg, bits, ratios) if symmetric else _least_squares_fit(wg, bits, steps)
        scales[rows], zeros[rows] = scale.clamp(min=_MIN_SCALE), zero
        codes = _codes(wg, scales[rows].float(), zeros[rows].float(), top)
        qweight[rows] = pack_int(codes.reshape(-1, k), bits)
    return qweight, scales, None if symmetric else zeros


def _fp8_error(rows: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Per row, the squared error of rows [R, K] stored as e4m3 with per-row `scale` [R]."""
    return (rows / scale[:, None]).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).float().mul_(scale[:, None]).sub_(rows) \
        .square_().sum(-1)


@torch.no_grad()
def quantize_fp8_search(w: torch.Tensor, factors: tuple[float, ...] = FP8_FACTORS,
                        combine=None) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (float8_e4m3fn [N, K], float32 scale [N]) as quantize_fp8(per_channel=True) returns
    them, each row's scale amax / 448 times the factor with the least squared error (1.0 = RTN; the
    first of equal ones). `combine(stat, "max" | "sum")`: a row-parallel shard's amax and errors over
    every rank's slice of K (autodeploy/parallel/rank_reduce.py: one collective each per tensor), so
    each rank picks the row's factor."""
    n, k = w.shape
    chunks = _row_chunks(n, k, w.device)
    amax = torch.cat([w[chunk].abs().amax(-1).float() for chunk in chunks])  # no float32 copy of the rows
    base = ((amax if combine is None else combine(amax, "max")) / FP8_MAX).clamp(min=_MIN_SCALE)
    errors = torch.cat([torch.stack([_fp8_error(w[chunk].float(), base[chunk] * factor) for factor in factors])
                        for chunk in chunks], dim=1)  # [factors, N]
    if combine is not None:
        errors = combine(errors, "sum")
    scales = base * torch.tensor(factors, dtype=base.dtype, device=base.device)[errors.argmin(0)]
    out = torch.empty(n, k, dtype=FP8_DTYPE, device=w.device)
    for chunk in chunks:
        out[chunk] = (w[chunk].float() / scales[chunk, None]).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return out, scales
