"""INT4 / INT8 weight-only GEMV for one to a few rows (decode at batch 1-4) on our canonical packing.

At batch 1 a quantized linear only streams its packed weights, so its time is their bytes over the
memory bandwidth - as long as unpacking keeps up and nothing else gets in the way. A `tl.dot` needs
the dequantized tile in the tensor-core operand layout (a round trip through shared memory per
tile) and pads the rows to 16; these kernels instead multiply on the CUDA cores in the layout the
weights are loaded in and reduce across K once, at the end:
  - each program owns BLOCK_N output columns and walks all of K; acc [ROWS, BLOCK_N, BLOCK_W] sums
    elementwise, so the loop body has no cross-thread reduction;
  - INT: a packed int32 word holds 32 // BITS consecutive columns. Column j of the word is
    ((word >> j*BITS) & mask) | 0x4B000000 read as float32 = 2**23 + code (ptxas fuses the and/or
    into one LOP3), and subtracting 2**23 (+ 2**(BITS-1) when symmetric) gives the code (minus the
    implicit zero point) exactly; explicit zero points, which a scale search may leave fractional, come
    off once per word as zero * sum(x); each word's partial dot is scaled by its group's scale (groups
    hold whole words).
(On CUDA most INT linears take the faster GEMV of kernels/triton_int_gemv.py on re-packed codes instead; FP8 takes
kernels/triton_fp8_gemv.py.) Weights never depend on the previous kernel, so with PDL the first words are asked of
L2 before the wait (kernels/triton_pdl.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_pdl import pdl_launch, prefetch_l2, wait_for_inputs

GEMV_ROWS = 4  # more rows: the tl.dot kernels
# From benchmarks/quant_knob_sweep.py on an H200 (BENCHMARKS.md): the best over the o / gate_up / down shapes.
INT_BLOCK_N, INT_BLOCK_W, INT_WARPS, INT_STAGES = 8, 256, 4, 3
PREFETCH_BYTES = 2048  # per weight row, asked of L2 before the PDL wait


@triton.jit
def _gemv_int_kernel(
    x_ptr, q_ptr, s_ptr, z_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_qn, stride_sn, stride_ym,
    BITS: tl.constexpr, GROUP_WORDS: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr,
    USE_PDL: tl.constexpr = False, PREFETCH_WORDS: tl.constexpr = 0,
):
    PER_WORD: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    words_per_row = K // PER_WORD
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_valid = offs_n < N
    rows = tl.where(n_valid, offs_n, 0).to(tl.int64)
    q_rows = q_ptr + rows[:, None] * stride_qn
    if PREFETCH_WORDS > 0:  # one address per 128-byte line (32 words)
        prefetch_l2(q_rows + tl.minimum(tl.arange(0, PREFETCH_WORDS // 32)[None, :] * 32, words_per_row - 1))
    wait_for_inputs(USE_PDL)
    offs_m = tl.arange(0, ROWS)
    m_valid = offs_m < M
    acc = tl.zeros([ROWS, BLOCK_N, BLOCK_W], tl.float32)
    for w0 in range(0, words_per_row, BLOCK_W):
        offs_w = w0 + tl.arange(0, BLOCK_W)
        w_valid = offs_w < words_per_row
        words = tl.load(q_rows + offs_w[None, :], mask=n_valid[:, None] & w_valid[None, :], other=0)
        group = offs_w // GROUP_WORDS if GROUP_WORDS > 0 else offs_w * 0
        sz_offsets = rows[:, None] * stride_sn + group[None, :]  # zeros share the scales' layout
        valid = n_valid[:, None] & w_valid[None, :]
        scale = tl.load(s_ptr + sz_offsets, mask=valid, other=0.0).to(tl.float32)
        # code - 2**(BITS-1) (symmetric) or the code itself (zero points: they may be fractional, which the
        # 2**23 offset would round, so they come off per word as zero * sum(x) below), exactly
        offset = 8388608.0 if HAS_ZEROS else 8388608.0 + (1 << (BITS - 1))
        part = tl.zeros([ROWS, BLOCK_N, BLOCK_W], tl.float32)
        x_sum = tl.zeros([ROWS, BLOCK_W], tl.float32)
        for j in tl.static_range(PER_WORD):
            code = ((words >> (j * BITS)) & MASK) | 0x4B000000
            w = code.to(tl.float32, bitcast=True) - offset
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + (offs_w * PER_WORD + j)[None, :],
                        mask=m_valid[:, None] & w_valid[None, :], other=0.0).to(tl.float32)
            part += w[None, :, :] * x[:, None, :]
            if HAS_ZEROS:
                x_sum += x
        if HAS_ZEROS:
            part -= tl.load(z_ptr + sz_offsets, mask=valid, other=0.0).to(tl.float32)[None, :, :] * x_sum[:, None, :]
        acc += part * scale[None, :, :]
    y = tl.sum(acc, axis=2)
    if HAS_BIAS:
        y += tl.load(b_ptr + offs_n, mask=n_valid, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], y.to(y_ptr.dtype.element_ty),
             mask=m_valid[:, None] & n_valid[None, :])


def gemv_int_supported(rows: int, g_idx, bits: int, group_size: int, k: int) -> bool:
    """The GEMV takes a few rows and groups made of whole words (group -1, or a multiple of 32 // bits)."""
    per_word = 32 // bits
    return (0 < rows <= GEMV_ROWS and g_idx is None and k % per_word == 0
            and (group_size == -1 or (group_size % per_word == 0 and k % group_size == 0)))


def _rows_tile(rows: int) -> int:
    return triton.next_power_of_2(rows)


def gemv_int_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                    bias: torch.Tensor | None, bits: int, group_size: int, block_n: int = INT_BLOCK_N,
                    block_w: int = INT_BLOCK_W, num_warps: int = INT_WARPS, num_stages: int = INT_STAGES) -> torch.Tensor:
    """x [..., K] @ dequantize(qweight).T (+ bias) for a few rows (see `gemv_int_supported`).
    The knobs are for benchmarks/quant_linear_bench.py."""
    n, k = qweight.shape[0], x.shape[-1]
    x2 = x.reshape(-1, k)
    x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
    qweight, scales = qweight.contiguous(), scales.contiguous()
    zeros = zeros.contiguous() if zeros is not None else scales
    rows = x2.shape[0]
    y = torch.empty(rows, n, dtype=x.dtype, device=x.device)
    launch = pdl_launch(x.device)
    words = k * bits // 32
    prefetch = min(PREFETCH_BYTES // 4, triton.next_power_of_2(words))
    launch["PREFETCH_WORDS"] = prefetch if launch["USE_PDL"] and prefetch >= 32 else 0
    _gemv_int_kernel[(triton.cdiv(n, block_n),)](
        x2, qweight, scales, zeros, bias if bias is not None else scales, y, rows, n, k,
        x2.stride(0), qweight.stride(0), scales.stride(0), y.stride(0),
        BITS=bits, GROUP_WORDS=0 if group_size == -1 else group_size * bits // 32, HAS_ZEROS=zeros is not scales,
        HAS_BIAS=bias is not None, ROWS=_rows_tile(rows), BLOCK_N=block_n, BLOCK_W=block_w,
        num_warps=num_warps, num_stages=num_stages, **launch,
    )
    return y.view(*x.shape[:-1], n)
