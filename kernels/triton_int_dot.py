"""Tensor-core dot for INT4 / INT8 weight-only linears at decode batches (5 to 64 rows).

Past the GEMV's few rows the INT backends dequantized the whole weight to bf16 every call and handed it to
cuBLAS: 0.5 (INT4) or 1 byte read, 2 written and 2 read again per weight, so INT decode at batch 64 ran at half
of bf16's speed on an H200 (BENCHMARKS.md session 12). This kernel reads each packed word once and never
writes the weight out: a program owns BLOCK_N weight rows and BLOCK_M rows of x, and per K step loads the words
of its [BLOCK_N, BLOCK_K] tile, unpacks the codes, dequantizes them in registers (float32, one FMA with the
row's scale and -zero * scale of the step's group) to x's dtype and runs one tl.dot. With SWAP the weight tile is
the MMA's A operand (BLOCK_N >= 64 takes Hopper's wgmma with A in registers), x's transposed tile its B.

Words: canonical (column (32 / bits) w + j in slot j of word w) or, with INTERLEAVED, the GEMV's re-packed ones
(kernels/triton_int_gemv.py: in each block of 4 words, word i holds column 4j + i of the block in slot j), which
is how `int_linear_gemv` and `int4_linear_tinygemm` store them: the tile's columns come out in their natural
order either way, so x is read as it is (no gather). SPLAT loads each column's word directly (the same word for
the codes it holds) instead of one load per word and a reshape of the unpacked [BLOCK_N, words, codes] tile: on
an H200 it ran 2-4x slower (the pipeliner stages the duplicated int32 tile through shared memory), so it stays off.
Few output tiles split K over programs (kernels/triton_split_k.py): N = 4096 makes only 64 tiles of 64 rows.
A K step never straddles a scale group: BLOCK_K divides the group (or the scales are per channel).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_split_k import k_range, split_launch, splits_for, sum_splits

# (block_m, block_n, block_k, warps, stages, swap, splat, split_k): int_dot's defaults (benchmarks/int_dot_sweep.py)
KNOBS = (64, 64, 128, 4, 4, False, False, 1)
# Rows `int_dot_linear` takes: the decode batches measured end to end (H200, BENCHMARKS.md session 13; at 128 rows
# the sweep's 128-row tiles still beat dequantize + cuBLAS on most 8B shapes, not yet wired in or run end to end).
DOT_ROWS = 64
WIDE_N = 8192  # wider outputs (fused gate/up) take the weight as the MMA's A operand, 128 rows a tile
# (block_m, block_n, warps, stages, swap) by (rows <= 16, wide): the best of the 8B shapes, INT4 and INT8 together
TILES = {(True, False): (16, 32, 2, 4, False), (True, True): (16, 128, 4, 4, True),
         (False, False): (64, 64, 4, 4, False), (False, True): (64, 128, 4, 4, True)}
SPLIT_PROGRAMS_PER_SM, SPLIT_MIN_STEPS, SPLIT_MAX = 4, 8, 4


@triton.jit
def _column_words(offs_k, BITS: tl.constexpr, INTERLEAVED: tl.constexpr):
    """(word, bit shift) of each column in offs_k."""
    PER_WORD: tl.constexpr = 32 // BITS
    if INTERLEAVED:
        block: tl.constexpr = 4 * PER_WORD
        return (offs_k // block) * 4 + offs_k % 4, ((offs_k % block) // 4) * BITS
    return offs_k // PER_WORD, (offs_k % PER_WORD) * BITS


@triton.jit
def _codes_tile(q_rows, n_valid, k0, K, BITS: tl.constexpr, INTERLEAVED: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr, SPLAT: tl.constexpr):
    """Codes of columns k0 .. k0 + BLOCK_K of the rows at q_rows ([BLOCK_N, 1] pointers) as int32 [BLOCK_N, BLOCK_K]."""
    PER_WORD: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    if SPLAT:
        offs_k = k0 + tl.arange(0, BLOCK_K)
        word, shift = _column_words(offs_k, BITS, INTERLEAVED)
        words = tl.load(q_rows + word[None, :], mask=n_valid & (offs_k < K)[None, :], other=0)
        return (words >> shift[None, :]) & MASK
    offs_w = k0 // PER_WORD + tl.arange(0, BLOCK_K // PER_WORD)
    words = tl.load(q_rows + offs_w[None, :], mask=n_valid & (offs_w < K // PER_WORD)[None, :], other=0)
    if INTERLEAVED:  # [N, blocks, slot j, word i] -> column 4j + i of each block
        words = tl.reshape(words, [BLOCK_N, BLOCK_K // (4 * PER_WORD), 1, 4])
        shifts = (tl.arange(0, PER_WORD) * BITS)[None, None, :, None]
    else:  # [N, word, slot j] -> column PER_WORD w + j
        words = tl.reshape(words, [BLOCK_N, BLOCK_K // PER_WORD, 1])
        shifts = (tl.arange(0, PER_WORD) * BITS)[None, None, :]
    return tl.reshape((words >> shifts) & MASK, [BLOCK_N, BLOCK_K])


@triton.jit
def _group_coefficients(s_ptr, z_ptr, rows, stride_sn, valid, group, BITS: tl.constexpr, HAS_ZEROS: tl.constexpr):
    """(scale, -zero * scale) in float32 of `group` for each of `rows`."""
    scale = tl.load(s_ptr + rows * stride_sn + group, mask=valid, other=0.0).to(tl.float32)
    if HAS_ZEROS:
        zero = tl.load(z_ptr + rows * stride_sn + group, mask=valid, other=0.0).to(tl.float32)
    else:
        zero = tl.full(scale.shape, 2.0 ** (BITS - 1), tl.float32)
    return scale, -zero * scale


@triton.jit
def _int_dot_kernel(
    x_ptr, q_ptr, s_ptr, z_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_qn, stride_sn, stride_ym,
    BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr,
    INTERLEAVED: tl.constexpr, INTERPRET: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, SWAP: tl.constexpr, SPLAT: tl.constexpr, SPLIT_K: tl.constexpr = 1, part_ptr=None,
    count_ptr=None,
):
    """y [M, N] = x [M, K] @ dequantize(q).T (+ b); GROUP: columns per scale (a multiple of BLOCK_K), 0 per channel."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    n_valid, m_valid = offs_n < N, offs_m < M
    rows = tl.where(n_valid, offs_n, 0).to(tl.int64)
    q_rows = q_ptr + rows[:, None] * stride_qn
    if SWAP:
        acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    k_start, k_end = k_range(K, BLOCK_K, SPLIT_K)
    first_group = tl.minimum(k_start, K - 1) // GROUP if GROUP > 0 else 0  # an empty last split reads a real group
    scale, offset = _group_coefficients(s_ptr, z_ptr, rows, stride_sn, n_valid, first_group, BITS, HAS_ZEROS)
    for k0 in range(k_start, k_end, BLOCK_K):
        if GROUP > 0:  # the next step's coefficients asked for now, used next step: no load latency in the chain
            next_group = tl.minimum(k0 + BLOCK_K, K - 1) // GROUP  # past the last step: the last group again
            next_scale, next_offset = _group_coefficients(s_ptr, z_ptr, rows, stride_sn, n_valid, next_group, BITS,
                                                          HAS_ZEROS)
        else:  # per channel: one pair for the whole row
            next_scale, next_offset = scale, offset
        codes = _codes_tile(q_rows, n_valid[:, None], k0, K, BITS, INTERLEAVED, BLOCK_N, BLOCK_K, SPLAT)
        # (code | 2**23 as float32) - 2**23 is the code exactly; then (code - zero) * scale in one FMA
        code = (codes | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
        w = code * scale[:, None] + offset[:, None]
        offs_k = k0 + tl.arange(0, BLOCK_K)
        if INTERPRET:  # the CPU interpreter: float32 dots (its half-precision dots are wrong)
            w = w.to(x_ptr.dtype.element_ty).to(tl.float32)
        else:
            w = w.to(x_ptr.dtype.element_ty)
        if SWAP:
            xt = tl.load(x_ptr + offs_m[None, :] * stride_xm + offs_k[:, None],
                         mask=m_valid[None, :] & (offs_k < K)[:, None], other=0.0)
            acc = tl.dot(w, xt.to(w.dtype), acc)
        else:
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                        mask=m_valid[:, None] & (offs_k < K)[None, :], other=0.0)
            acc = tl.dot(x.to(w.dtype), tl.trans(w), acc)
        scale, offset = next_scale, next_offset
    if SWAP:
        acc = tl.trans(acc)
    if SPLIT_K > 1:  # the tile's last split to arrive stores the sum of all
        acc, last = sum_splits(acc, part_ptr, count_ptr, offs_m, offs_n, m_valid[:, None] & n_valid[None, :], M, N,
                               SPLIT_K)
        m_valid = m_valid & last
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_valid, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=m_valid[:, None] & n_valid[None, :])


def int_dot_supported(k: int, bits: int, group_size: int, block_k: int = KNOBS[2]) -> bool:
    """Whether int_dot takes a [*, k] weight of `bits` with `group_size` (-1: per channel): K tiles of block_k
    inside one scale group, whole words and, for the re-packed layout, whole blocks of 4 words."""
    if bits not in (4, 8) or k % (4 * 32 // bits):
        return False
    step = min(block_k, group_size) if group_size > 0 else block_k
    return group_size == -1 or (group_size & (group_size - 1) == 0 and group_size >= 16 and k % group_size == 0
                                and step % (4 * 32 // bits) == 0)


def int_dot(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
            bias: torch.Tensor | None, bits: int, group_size: int, interleaved: bool = False,
            block_m: int = KNOBS[0], block_n: int = KNOBS[1], block_k: int = KNOBS[2], num_warps: int = KNOBS[3],
            num_stages: int = KNOBS[4], swap: bool = KNOBS[5], splat: bool = KNOBS[6],
            split_k: int = KNOBS[7]) -> torch.Tensor:
    """x [..., K] @ dequantize(qweight, scales, zeros).T (+ bias) in x's dtype; qweight canonical or, with
    `interleaved`, the GEMV's re-packed words. Shapes must pass `int_dot_supported`; the knobs are for the sweep."""
    k = x.shape[-1]
    n = qweight.shape[0]
    if not int_dot_supported(k, bits, group_size, block_k):
        raise ValueError(f"int_dot does not take K={k}, int{bits}, group {group_size}")
    x2 = x.reshape(-1, k)
    x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
    m = x2.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    step = min(block_k, group_size) if group_size > 0 else block_k
    grid = (triton.cdiv(n, block_n), triton.cdiv(m, block_m))
    split = split_launch(split_k, grid[0] * grid[1], triton.cdiv(k, step), m, n, x.device)
    scales = scales.contiguous()
    _int_dot_kernel[grid + (split["SPLIT_K"],)](
        x2, qweight.contiguous(), scales, zeros.contiguous() if zeros is not None else scales,
        bias if bias is not None else scales, y, m, n, k, x2.stride(0), qweight.stride(0), scales.stride(0), y.stride(0),
        BITS=bits, GROUP=0 if group_size == -1 else group_size, HAS_ZEROS=zeros is not None, HAS_BIAS=bias is not None,
        INTERLEAVED=interleaved, INTERPRET=not x.is_cuda, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=step, SWAP=swap,
        SPLAT=splat, num_warps=num_warps, num_stages=num_stages, **split,
    )
    return y.view(*x.shape[:-1], n)


def int_dot_linear(x: torch.Tensor, words: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                   bias: torch.Tensor | None, bits: int, group_size: int, interleaved: bool) -> torch.Tensor:
    """int_dot with the tile and split picked for x's rows (up to DOT_ROWS) and the weight's shape: the wide
    outputs' 128-row tiles already make ~2 programs per SM and lose when split."""
    n, k = words.shape[0], x.shape[-1]
    rows = x.numel() // k
    block_m, block_n, warps, stages, swap = TILES[(rows <= 16, n > WIDE_N)]
    block_m = min(block_m, max(16, triton.next_power_of_2(rows)))
    step = min(KNOBS[2], group_size) if group_size > 0 else KNOBS[2]
    tiles = triton.cdiv(n, block_n) * triton.cdiv(rows, block_m)
    # a program's time follows its K steps, and N = 4096 makes only 64 tiles of 64
    split = 1 if swap else splits_for(tiles, triton.cdiv(k, step), x.device, SPLIT_PROGRAMS_PER_SM, SPLIT_MIN_STEPS,
                                      SPLIT_MAX)
    return int_dot(x, words, scales, zeros, bias, bits, group_size, interleaved, block_m, block_n, KNOBS[2], warps,
                   stages, swap, False, split)
