"""Quantizing to e4m3 inside Triton kernels, the same on the GPU and in the CPU interpreter.

On the GPU `.to(tl.float8e4nv)` is the hardware conversion (round to nearest even). The interpreter's
misrounds some values (7.888 -> 4.0), so there the rounding is done in float32 arithmetic instead
(adding and subtracting 1.5 * 2**23 steps rounds to a multiple of the step, ties to even): the values
are the same, so interpreter tests check the kernels' logic against the references exactly.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def round_to_e4m3(v):
    """v (float32 within +-448) rounded to the nearest e4m3 value, kept in float32 (signed zeros kept)."""
    bits = v.to(tl.int32, bitcast=True)
    exponent = ((bits >> 23) & 0xFF) - 127
    step = (((tl.maximum(exponent, -6) - 3) + 127) << 23).to(tl.float32, bitcast=True)  # 3 mantissa bits
    big = step * 12582912.0
    rounded = (tl.abs(v) + big) - big
    return tl.where(bits < 0, -rounded, rounded)


@triton.jit
def saturate_e4m3(v, INTERPRET: tl.constexpr):
    """float32 v saturated to +-448 (e4m3's largest) and rounded to e4m3: float8e4nv on the GPU, float32
    holding the same value in the interpreter."""
    v = tl.clamp(v, -448.0, 448.0)
    if INTERPRET:
        return round_to_e4m3(v)
    return v.to(tl.float8e4nv)


@triton.jit
def store_tile_quantized(y, out_ptrs, mask, scale_ptrs, scale_mask, INTERPRET: tl.constexpr, static_ptr=None,
                         STATIC: tl.constexpr = False):
    """A [groups, group] float32 tile stored as e4m3, one scale (amax / 448) per tile row: per-token-group
    quantization as the reference does it (one row = one group, or a whole token); with STATIC every tile row's
    scale is the one at static_ptr (a static input scale)."""
    if STATIC:
        scale = tl.zeros([y.shape[0]], tl.float32) + tl.load(static_ptr).to(tl.float32)
    else:
        scale = tl.maximum(tl.max(tl.abs(y), axis=1) / 448.0, 1e-12)
    tl.store(out_ptrs, saturate_e4m3(y / scale[:, None], INTERPRET).to(out_ptrs.dtype.element_ty), mask=mask)
    tl.store(scale_ptrs, scale, mask=scale_mask)


@triton.jit
def activation_scales(x_rows, xs_ptr, m_valid, K, ACT: tl.constexpr, ROWS: tl.constexpr, BLOCK_K: tl.constexpr):
    """float32 [ROWS] scale of each row of x (pointers x_rows [ROWS, 1]): the static one (ACT 0), or
    amax / 448 per row (ACT 1, per token) or of all rows (ACT 2, per tensor), from one pass over x."""
    if ACT == 0:
        sx = tl.zeros([ROWS], tl.float32) + tl.load(xs_ptr).to(tl.float32)
    else:
        amax = tl.zeros([ROWS], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_rows + offs_k[None, :], mask=m_valid[:, None] & (offs_k < K)[None, :], other=0.0)
            amax = tl.maximum(amax, tl.max(tl.abs(x.to(tl.float32)), axis=1))
        if ACT == 2:
            amax = tl.zeros([ROWS], tl.float32) + tl.max(amax, axis=0)
        sx = tl.maximum(amax / 448.0, 1e-12)
    return sx


@triton.jit
def store_scaled(acc, sx, ws_ptr, b_ptr, y_ptr, offs_m, offs_n, m_valid, n_valid, stride_ym,
                 W_PER_CHANNEL: tl.constexpr, HAS_BIAS: tl.constexpr, W_APPLIED: tl.constexpr = False):
    """y = acc [ROWS, N] * activation scale * weight scale (+ bias), stored in y's dtype (W_APPLIED: acc already
    holds the weight's block scales)."""
    acc = acc * sx[:, None]
    if W_PER_CHANNEL and not W_APPLIED:
        acc = acc * tl.load(ws_ptr + offs_n, mask=n_valid, other=0.0)[None, :]
    elif not W_APPLIED:
        acc = acc * tl.load(ws_ptr)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_valid, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=m_valid[:, None] & n_valid[None, :])
