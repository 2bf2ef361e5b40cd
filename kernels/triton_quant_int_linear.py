"""Triton backend of `autodeploy::int_linear` (INT4 / INT8 weight-only), the `int_linear_triton` op.

A few rows (decode): one skinny dequant-GEMM. Each program owns BLOCK_N output columns and walks all
of K, loading every packed int32 word once, unpacking it in registers, applying the group's zero point
and scale, and feeding tl.dot in x's dtype (rows padded to 16). At batch 1 the time is the packed
bytes over memory bandwidth (INT4 g128: 0.5 + 2/128 bytes per weight with bf16 scales, 2/128 more
with zero points: ~0.26-0.27x bf16), as long as the unpacking keeps up, so it is kept to a few integer ops per weight: shift and mask,
and the int -> float conversion by the exponent trick ((code | 0x4B000000) as float32 is 2**23 + code,
exactly) instead of the slower I2F. Scales and zeros are loaded once per (row, group) when the group
is a power of two (the usual 32/64/128, and per channel); GPTQ act-order (`g_idx`) gathers per column.
PDL and the L2 prefetch of the first weight words follow kernels/triton_linear.py.
More rows (prefill): a dequantize kernel writes the weight in x's dtype and cuBLAS multiplies.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from autodeploy.errors import QuantizationError

from .quant_format import check_bits, groups_of
from .triton_linear import PREFETCH_K, SKINNY_ROWS
from .triton_quant_gemv import gemv_int_linear, gemv_int_supported
from .triton_pdl import pdl_launch, prefetch_l2, wait_for_inputs

# Defaults not yet measured on a GPU (benchmarks/quant_linear_bench.py sweeps them): a 32 x 512 tile
# is 8 KB of INT4 per pipeline stage, so 4 stages keep ~32 KB in flight per program, about what one
# SM needs to pull its share of HBM bandwidth; 8 warps keep the dequantized tile in registers.
BLOCK_N = 32
BLOCK_K = 512
NUM_WARPS = 8
NUM_STAGES = 4
SPLAT_WORDS = False
DEQUANT_BLOCK = (64, 128)  # (n, k) tile of the prefill dequantize kernel


@triton.jit
def _dequant_tile(q_rows, s_rows, z_rows, gidx_ptr, n_valid, k0, K,
                  BITS: tl.constexpr, GROUP: tl.constexpr, GATHER: tl.constexpr, HAS_ZEROS: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPAN: tl.constexpr, SPLAT_WORDS: tl.constexpr):
    """Columns k0 .. k0 + BLOCK_K of the BLOCK_N weight rows at q_rows / s_rows / z_rows ([BLOCK_N, 1]
    pointers), dequantized to float32 [BLOCK_N, BLOCK_K]; columns past K come out 0.
    GROUP: columns per scale (a power of two; 0 = per channel); GATHER: group of column k = gidx[k];
    SPAN: columns sharing one scale inside the tile (min(GROUP, BLOCK_K), BLOCK_K per channel).
    SPLAT_WORDS: each column loads its own word (same-address loads, served once per warp) instead of
    one load per word and a reshape [N, words, codes] -> [N, K] (which may cost a layout conversion):
    a knob for the benchmark to settle on the GPU."""
    if SPLAT_WORDS:
        offs_k = k0 + tl.arange(0, BLOCK_K)
        words = tl.load(q_rows + (offs_k // (32 // BITS))[None, :], mask=n_valid & (offs_k < K)[None, :], other=0)
        codes = (words >> ((offs_k % (32 // BITS)) * BITS)[None, :]) & ((1 << BITS) - 1)
    else:
        offs_w = k0 // (32 // BITS) + tl.arange(0, BLOCK_K // (32 // BITS))
        words = tl.load(q_rows + offs_w[None, :], mask=n_valid & (offs_w < K // (32 // BITS))[None, :], other=0)
        shifts = tl.arange(0, 32 // BITS) * BITS
        codes = (words[:, :, None] >> shifts[None, None, :]) & ((1 << BITS) - 1)
        codes = tl.reshape(codes, [BLOCK_N, BLOCK_K])
    q = (codes | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
    if GATHER:
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_valid = offs_k < K
        g = tl.load(gidx_ptr + offs_k, mask=k_valid, other=0)
        mask = n_valid & k_valid[None, :]
        scale = tl.load(s_rows + g[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_ZEROS:
            q -= tl.load(z_rows + g[None, :], mask=mask, other=0.0).to(tl.float32)
        else:
            q -= 1 << (BITS - 1)
        return q * scale
    first = k0 + tl.arange(0, BLOCK_K // SPAN) * SPAN  # first column of each scale span
    if GROUP > 0:
        g = first // GROUP
    else:
        g = first * 0
    mask = n_valid & (first < K)[None, :]
    scale = tl.load(s_rows + g[None, :], mask=mask, other=0.0).to(tl.float32)[:, :, None]
    q = tl.reshape(q, [BLOCK_N, BLOCK_K // SPAN, SPAN])
    if HAS_ZEROS:
        q -= tl.load(z_rows + g[None, :], mask=mask, other=0.0).to(tl.float32)[:, :, None]
    else:
        q -= 1 << (BITS - 1)
    return tl.reshape(q * scale, [BLOCK_N, BLOCK_K])


@triton.jit
def _skinny_int_kernel(
    x_ptr, q_ptr, s_ptr, z_ptr, gidx_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_qn, stride_sn, stride_ym,
    BITS: tl.constexpr, GROUP: tl.constexpr, GATHER: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr,
    INTERPRET: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPAN: tl.constexpr, SPLAT_WORDS: tl.constexpr, USE_PDL: tl.constexpr = False, PREFETCH_WORDS: tl.constexpr = 0,
):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    n_valid = (offs_n < N)[:, None]
    m_valid = offs_m < M
    rows = tl.where(offs_n < N, offs_n, 0)[:, None].to(tl.int64)
    q_rows = q_ptr + rows * stride_qn
    # The packed weights never depend on the previous kernel: pull the first words into L2 meanwhile.
    if PREFETCH_WORDS > 0:  # one address per 128-byte line (32 words)
        prefetch_l2(q_rows + tl.minimum(tl.arange(0, PREFETCH_WORDS // 32)[None, :] * 32, K * BITS // 32 - 1))
    wait_for_inputs(USE_PDL)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        w = _dequant_tile(q_rows, s_ptr + rows * stride_sn, z_ptr + rows * stride_sn, gidx_ptr, n_valid, k0, K,
                          BITS, GROUP, GATHER, HAS_ZEROS, BLOCK_N, BLOCK_K, SPAN, SPLAT_WORDS)
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=m_valid[:, None] & (offs_k < K)[None, :], other=0.0)
        if INTERPRET:  # the CPU interpreter (its half-precision dots are wrong)
            acc = tl.dot(x.to(tl.float32), tl.trans(w), acc)
        else:
            acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=m_valid[:, None] & (offs_n < N)[None, :])


@triton.jit
def _dequant_kernel(q_ptr, s_ptr, z_ptr, gidx_ptr, w_ptr, N, K, stride_qn, stride_sn, stride_wn,
                    BITS: tl.constexpr, GROUP: tl.constexpr, GATHER: tl.constexpr, HAS_ZEROS: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPAN: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    n_valid = (offs_n < N)[:, None]
    rows = tl.where(offs_n < N, offs_n, 0)[:, None].to(tl.int64)
    w = _dequant_tile(q_ptr + rows * stride_qn, s_ptr + rows * stride_sn, z_ptr + rows * stride_sn, gidx_ptr,
                      n_valid, k0, K, BITS, GROUP, GATHER, HAS_ZEROS, BLOCK_N, BLOCK_K, SPAN, False)
    offs_k = k0 + tl.arange(0, BLOCK_K)
    tl.store(w_ptr + rows * stride_wn + offs_k[None, :], w.to(w_ptr.dtype.element_ty),
             mask=n_valid & (offs_k < K)[None, :])


def _layout(qweight, scales, zeros, g_idx, bits, group_size, k) -> dict:
    """The kernels' format keywords (and a check of the shapes the reference would reject)."""
    check_bits(bits, k)
    if qweight.shape[-1] * (32 // bits) != k:
        raise QuantizationError(f"qweight has {qweight.shape[-1]} words per row, {k} {bits}-bit columns need {k * bits // 32}")
    if g_idx is None:
        groups_of(k, group_size)
    power_of_two = group_size == -1 or group_size & (group_size - 1) == 0
    return dict(BITS=bits, GROUP=0 if group_size == -1 else group_size,
                GATHER=g_idx is not None or not power_of_two, HAS_ZEROS=zeros is not None)


def _span(meta: dict, block_k: int) -> int:
    """Columns sharing one scale inside a K tile of `block_k` (a power of two, >= 16: tl.dot's minimum)."""
    if block_k < 16 or block_k & (block_k - 1):
        raise ValueError(f"block_k must be a power of two >= 16, not {block_k}")
    group = meta["GROUP"]
    return block_k if group == 0 or group > block_k or meta["GATHER"] else group


def _gather_index(g_idx, group_size, k, device) -> torch.Tensor:
    """Per-column group for the gather path: g_idx, or k // group_size for a group that is no power of two."""
    if g_idx is not None:
        return g_idx.to(torch.int32)
    return torch.arange(k, device=device, dtype=torch.int32) // group_size


def skinny_int_linear(x, qweight, scales, zeros=None, g_idx=None, bias=None, bits=4, group_size=128,
                      block_n: int = BLOCK_N, block_k: int = BLOCK_K, num_warps: int = NUM_WARPS,
                      num_stages: int = NUM_STAGES, splat_words: bool = SPLAT_WORDS) -> torch.Tensor:
    """x [..., K] @ dequantize(qweight).T (+ bias), all rows of x in one tile (meant for a few).
    The knobs are for benchmarks/quant_linear_bench.py."""
    n, k = qweight.shape[0], x.shape[-1]
    meta = _layout(qweight, scales, zeros, g_idx, bits, group_size, k)
    x2 = x.reshape(-1, k)
    x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
    qweight, scales = qweight.contiguous(), scales.contiguous()
    zeros = zeros.contiguous() if zeros is not None else scales
    gidx = _gather_index(g_idx, group_size, k, x.device) if meta["GATHER"] else qweight
    rows = x2.shape[0]
    y = torch.empty(rows, n, dtype=x.dtype, device=x.device)
    launch = pdl_launch(x.device)
    words = k * bits // 32
    prefetch = min(triton.next_power_of_2(PREFETCH_K * bits // 16), triton.next_power_of_2(words))
    launch["PREFETCH_WORDS"] = prefetch if launch["USE_PDL"] and prefetch >= 32 else 0
    _skinny_int_kernel[(triton.cdiv(n, block_n),)](
        x2, qweight, scales, zeros, gidx, bias if bias is not None else scales, y, rows, n, k,
        x2.stride(0), qweight.stride(0), scales.stride(0), y.stride(0),
        HAS_BIAS=bias is not None, INTERPRET=not x.is_cuda, BLOCK_M=max(16, triton.next_power_of_2(rows)), BLOCK_N=block_n,
        BLOCK_K=block_k, SPAN=_span(meta, block_k), SPLAT_WORDS=splat_words, num_warps=num_warps, num_stages=num_stages,
        **meta, **launch,
    )
    return y.view(*x.shape[:-1], n)


def dequantize_int_triton(qweight, scales, zeros, g_idx, bits, group_size, k, dtype: torch.dtype) -> torch.Tensor:
    """The whole weight [N, K] in `dtype` (for a cuBLAS GEMM over many rows)."""
    meta = _layout(qweight, scales, zeros, g_idx, bits, group_size, k)
    n = qweight.shape[0]
    qweight, scales = qweight.contiguous(), scales.contiguous()
    zeros = zeros.contiguous() if zeros is not None else scales
    gidx = _gather_index(g_idx, group_size, k, qweight.device) if meta["GATHER"] else qweight
    w = torch.empty(n, k, dtype=dtype, device=qweight.device)
    bn, bk = DEQUANT_BLOCK
    _dequant_kernel[(triton.cdiv(n, bn), triton.cdiv(k, bk))](
        qweight, scales, zeros, gidx, w, n, k, qweight.stride(0), scales.stride(0), w.stride(0),
        BLOCK_N=bn, BLOCK_K=bk, SPAN=_span(meta, bk), **meta,
    )
    return w


def int_linear(x, qweight, scales, zeros=None, g_idx=None, bias=None, bits=4, group_size=128) -> torch.Tensor:
    """The backend: the skinny kernel for a few half-precision rows, dequantize + cuBLAS for more, the
    reference off CUDA (where Triton would only interpret)."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if not x.is_cuda or x.dtype not in (torch.bfloat16, torch.float16) or rows == 0:
        return torch.ops.autodeploy.int_linear(x, qweight, scales, zeros, g_idx, bias, bits, group_size)
    if gemv_int_supported(rows, g_idx, bits, group_size, x.shape[-1]):
        return gemv_int_linear(x, qweight, scales, zeros, bias, bits, group_size)
    if rows <= SKINNY_ROWS:
        return skinny_int_linear(x, qweight, scales, zeros, g_idx, bias, bits, group_size)
    w = dequantize_int_triton(qweight, scales, zeros, g_idx, bits, group_size, x.shape[-1], x.dtype)
    return F.linear(x, w, bias.to(x.dtype) if bias is not None else None)
