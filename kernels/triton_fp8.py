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
