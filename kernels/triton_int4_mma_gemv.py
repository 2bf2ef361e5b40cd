"""INT4 weight-only GEMV on tensor cores for decode batches (up to eight rows of bf16 x), on the GEMV's words.

At 5-8 rows tinygemm (what INT4 decode batches ran) and the CUDA-core GEMV (kernels/triton_int_gemv.py, which
stops at 4 rows and slows past one: each row of x repeats its ~3 instructions per weight) both stay far from the
bytes' time. Here the multiply-adds go to `mma.sync.m16n8k16` (bf16 in, float32 accumulate), W as the 16-row
operand and x's rows as the 8 columns, so 8 rows cost about what one does:
- a lane's A fragment for one 16-row tile and 16 columns holds 4 codes of each of its two rows; its codes become
  bf16 `128 + code` with a shift and one LOP3 per pair (OR into 128, whose mantissa's last bit is 1), and one
  MMA serves 256 weights;
- the 128 left in every code is taken off per group with x's column sums, which a second MMA per 16 columns forms
  from the same x fragments (all-ones A): sum (128 + c - z) s x = s (D - 128 X) - z s X, with the CUDA-core GEMV's
  float32 coefficients (2**48 s, -z s);
- the MMA's k order is any order both operands share, so the words stay those of `interleave_codes` (stored once,
  the other INT4 paths read them): of each 64-column chunk of a row, lane t (of the 4 sharing a row) reads words
  2t and 2t + 1 in one 8-byte load, and its x fragments are the columns those words hold, paired by one PRMT;
- a program's warps take TILES 16-row tiles times SPLIT ranges of K (summed across warps at the end), UNROLL
  groups a step with their loads issued together; products are exact in float32 and each group's sums are scaled
  once, so the result is the reference's to float32 rounding.
On an H200 (BENCHMARKS.md, session 22) the 8B shape's four linears take ~105 us at 8 rows against tinygemm's 157
(INT4 batch 8: 1,714 against 1,317 tok/s), but ~62 us at one row against the CUDA-core GEMV's 49: a warp's loads
span 16 rows, 64 bytes of each, where the GEMV's read 512 contiguous bytes of one, so the GEMV keeps one row.
The interpreter runs no PTX: there `_mma` forms the same fragments' product with plain tensor ops, so the CPU tests
check which code meets which column; the GPU tests check the instruction.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_int_gemv import PRODUCT_SHIFT
from .triton_pdl import pdl_launch, wait_for_inputs

MAX_ROWS = 8  # x's rows are the MMA's 8 columns
CHUNK = tl.constexpr(64)  # columns of a row that its 4 lanes load at once: 8 words, 2 per lane
BF16_128 = tl.constexpr(0x43004300)  # bf16 128.0 in both halves; its last mantissa bit is 1
BF16_ONES = tl.constexpr(0x3F803F80)


def knobs_for(k: int) -> tuple[int, int, int]:
    """(tiles, split, unroll): warps along N (a 16-row tile each), warps along K, units (groups) a K step. From
    benchmarks/int4_tinygemm_bench.py --mma-knobs on an H200 at 8 rows (BENCHMARKS.md, session 22): (1, 4, 4) the
    best for Llama-3.1-8B's qkv and gate_up (o's best, (1, 4, 8), 3 % ahead), (1, 8, 2) for down (K 14,336)."""
    return (1, 8, 2) if k > 8192 else (1, 4, 4)


def flush_columns(group_size: int) -> int:
    """Columns between applications of the coefficients: one group, or 128 for per-channel scales."""
    return 128 if group_size == -1 else group_size


def mma_gemv_supported(rows: int, k: int, group_size: int, dtype: torch.dtype) -> bool:
    """bf16 x of 1-8 rows, K in whole 64-column chunks and groups of whole chunks."""
    flush = flush_columns(group_size)
    return (dtype == torch.bfloat16 and 0 < rows <= MAX_ROWS and flush % CHUNK.value == 0 and k % flush == 0
            and (group_size == -1 or k % group_size == 0))


@triton.jit
def _as_floats(pairs):
    """uint32 bf16 pairs -> (low, high) halves as float32 tiles."""
    return (pairs << 16).to(tl.float32, bitcast=True), (pairs & 0xFFFF0000).to(tl.float32, bitcast=True)


@triton.jit
def _k_halves(first, second, LEAD: tl.constexpr, S: tl.constexpr):
    """[LEAD, S, 32] fragments holding k = 2t + e (first) and 8 + 2t + e (second) of lane 4g + t, e the half, as
    [LEAD, S, 8 (g), 16 (k)] float32."""
    lo, hi = _as_floats(first)
    k_first = tl.reshape(tl.join(tl.reshape(lo, [LEAD, S, 8, 4]), tl.reshape(hi, [LEAD, S, 8, 4])), [LEAD, S, 8, 8])
    lo, hi = _as_floats(second)
    k_second = tl.reshape(tl.join(tl.reshape(lo, [LEAD, S, 8, 4]), tl.reshape(hi, [LEAD, S, 8, 4])), [LEAD, S, 8, 8])
    return tl.reshape(tl.permute(tl.join(k_first, k_second), (0, 1, 2, 4, 3)), [LEAD, S, 8, 16])


@triton.jit
def _emulated_mma(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3, LEAD: tl.constexpr, S: tl.constexpr):
    """What mma.sync.m16n8k16.row.col.f32.bf16.bf16.f32 computes from [LEAD, S, 32] fragments, in plain tensor ops
    for the interpreter: A (16 x 16) and B (16 x 8) rebuilt from the lanes (PTX ISA's fragment
    layouts), D = A B + C handed back to the lanes."""
    a = tl.join(_k_halves(a0, a2, LEAD, S), _k_halves(a1, a3, LEAD, S))  # [LEAD, S, g, k, row g or g + 8]
    a = tl.reshape(tl.permute(a, (0, 1, 4, 2, 3)), [LEAD, S, 16, 16])
    b_t = _k_halves(b0, b1, LEAD, S)  # [LEAD, S, n (= g), k]
    d = tl.sum(a[:, :, :, None, :] * b_t[:, :, None, :, :], axis=4)  # [LEAD, S, 16 (row 8h + g), 8 (col 2t + e)]
    d = tl.reshape(tl.permute(tl.reshape(d, [LEAD, S, 2, 8, 4, 2]), (0, 1, 3, 4, 2, 5)), [LEAD, S, 32, 2, 2])
    d_col_even, d_col_odd = tl.split(d)  # [LEAD, S, 32, 2 (h)]
    d0, d2 = tl.split(d_col_even)
    d1, d3 = tl.split(d_col_odd)
    return c0 + d0, c1 + d1, c2 + d2, c3 + d3


@triton.jit
def _by_unit(frag, UNROLL: tl.constexpr, WARPS: tl.constexpr):
    """A [WARPS * 32, UNROLL or 1] fragment tile as [UNROLL, WARPS, 32] (the emulation's lanes last)."""
    return tl.reshape(tl.permute(tl.broadcast_to(frag, [WARPS * 32, UNROLL]), (1, 0)), [UNROLL, WARPS, 32])


@triton.jit
def _by_thread(frag, UNROLL: tl.constexpr, WARPS: tl.constexpr):
    """[UNROLL, WARPS, 32] back to [WARPS * 32, UNROLL]."""
    return tl.permute(tl.reshape(frag, [UNROLL, WARPS * 32]), (1, 0))


@triton.jit
def _mma(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3, UNROLL: tl.constexpr, WARPS: tl.constexpr,
         INTERPRET: tl.constexpr):
    """D = A B + C, one m16n8k16 MMA per warp and unit: the fragments are [WARPS * 32, UNROLL] tiles (b, and a for
    x's sums, may be [WARPS * 32, 1]). Thread i must hold row i of every tile (lane i % 32 of warp i // 32) and its
    UNROLL columns in its registers, so that each asm instance is one warp's MMA on its lanes' fragments;
    tests/test_kernels_compile_sm90.py checks the compiled layout."""
    if INTERPRET:
        d0, d1, d2, d3 = _emulated_mma(
            _by_unit(a0, UNROLL, WARPS), _by_unit(a1, UNROLL, WARPS), _by_unit(a2, UNROLL, WARPS),
            _by_unit(a3, UNROLL, WARPS), _by_unit(b0, UNROLL, WARPS), _by_unit(b1, UNROLL, WARPS),
            _by_unit(c0, UNROLL, WARPS), _by_unit(c1, UNROLL, WARPS), _by_unit(c2, UNROLL, WARPS),
            _by_unit(c3, UNROLL, WARPS), UNROLL, WARPS)
        return _by_thread(d0, UNROLL, WARPS), _by_thread(d1, UNROLL, WARPS), _by_thread(d2, UNROLL, WARPS), \
            _by_thread(d3, UNROLL, WARPS)
    return tl.inline_asm_elementwise(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {$0, $1, $2, $3}, {$4, $5, $6, $7}, "
        "{$8, $9}, {$10, $11, $12, $13};", "=f,=f,=f,=f,r,r,r,r,r,r,f,f,f,f", [a0, a1, a2, a3, b0, b1, c0, c1, c2, c3],
        dtype=(tl.float32, tl.float32, tl.float32, tl.float32), is_pure=True, pack=1)


@triton.jit
def _codes(words, PAIR: tl.constexpr, INTERPRET: tl.constexpr):
    """Codes PAIR and PAIR + 4 of each word (bits 4 PAIR and 16 + 4 PAIR) as the bf16 pair 128 + code: a shift and
    one LOP3 ((w & mask) | magic; written as PTX, since the compiler leaves the AND and the OR apart)."""
    shifted = words >> (4 * PAIR) if PAIR > 0 else words
    if INTERPRET:
        return (shifted & 0x000F000F) | BF16_128
    return tl.inline_asm_elementwise("lop3.b32 $0, $1, 0x000F000F, 0x43004300, 0xEA;", "=r,r", [shifted],
                                     dtype=tl.uint32, is_pure=True, pack=1)


@triton.jit
def _halves(a, b, HIGH: tl.constexpr, INTERPRET: tl.constexpr):
    """The low (HIGH 0) or high halves of uint32s a and b as one uint32 (a's in bits 0-15): one PRMT."""
    if INTERPRET:
        return (a & 0xFFFF) | (b << 16) if HIGH == 0 else (a >> 16) | (b & 0xFFFF0000)
    if HIGH == 0:
        return tl.inline_asm_elementwise("prmt.b32 $0, $1, $2, 0x5410;", "=r,r,r", [a, b], dtype=tl.uint32,
                                         is_pure=True, pack=1)
    return tl.inline_asm_elementwise("prmt.b32 $0, $1, $2, 0x7632;", "=r,r,r", [a, b], dtype=tl.uint32,
                                     is_pure=True, pack=1)


@triton.jit
def _words(ptrs, mask):
    """A lane's two words (one 8-byte load) as uint32 (lower address first)."""
    both = tl.load(ptrs, mask=mask, other=0)
    return (both & 0xFFFFFFFF).to(tl.uint32), (both >> 32).to(tl.uint32)


@triton.jit
def _x_pair(ptrs, mask):
    """x's bf16 pairs at ptrs (x viewed as int32) as uint32."""
    return tl.load(ptrs, mask=mask, other=0).to(tl.uint32, bitcast=True)


@triton.jit
def _chunk(lo0, lo1, hi0, hi1, x_chunk, x_mask, d0, d1, d2, d3, s0, s1, s2, s3, ones, UNROLL: tl.constexpr,
           WARPS: tl.constexpr, INTERPRET: tl.constexpr):
    """One 64-column chunk: four k16 steps (code pairs 2 sp and 2 sp + 1 of words 2t + v) of the tile's rows g (lo)
    and g + 8 (hi), and the same steps of x's column sums (A all ones). x's pairs j = 2 sp, 2 sp + 4, 2 sp + 1,
    2 sp + 5 hold word v's columns in their half v."""
    for sp in tl.static_range(2):
        xa = _x_pair(x_chunk + 4 * sp, x_mask)
        xb = _x_pair(x_chunk + 4 * sp + 8, x_mask)
        xc = _x_pair(x_chunk + 4 * sp + 2, x_mask)
        xd = _x_pair(x_chunk + 4 * sp + 10, x_mask)
        for v in tl.static_range(2):
            b0 = _halves(xa, xb, v, INTERPRET)
            b1 = _halves(xc, xd, v, INTERPRET)
            lo = lo0 if v == 0 else lo1
            hi = hi0 if v == 0 else hi1
            d0, d1, d2, d3 = _mma(_codes(lo, 2 * sp, INTERPRET), _codes(hi, 2 * sp, INTERPRET),
                                  _codes(lo, 2 * sp + 1, INTERPRET), _codes(hi, 2 * sp + 1, INTERPRET),
                                  b0, b1, d0, d1, d2, d3, UNROLL, WARPS, INTERPRET)
            s0, s1, s2, s3 = _mma(ones, ones, ones, ones, b0, b1, s0, s1, s2, s3, UNROLL, WARPS, INTERPRET)
    return d0, d1, d2, d3, s0, s1, s2, s3


@triton.jit
def _int4_mma_gemv_kernel(
    x_ptr, q_ptr, c_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_qn, stride_cn, stride_ym,
    GROUP_COLS: tl.constexpr, FLUSH_CHUNKS: tl.constexpr, HAS_BIAS: tl.constexpr, ROWS: tl.constexpr,
    TILES: tl.constexpr, SPLIT: tl.constexpr, UNROLL: tl.constexpr, INTERPRET: tl.constexpr,
    USE_PDL: tl.constexpr = False,
):
    # Thread i is lane i % 32 of warp i // 32. Warp w takes 16-row tile w % TILES of the program's over K range
    # w // TILES of SPLIT, UNROLL units (groups) a step. Tiles are [WARPS * 32, UNROLL]: the units in each thread's
    # registers (see `_mma`), so a step's loads are one instruction each and all in flight before its MMAs.
    WARPS: tl.constexpr = TILES * SPLIT
    i = tl.arange(0, WARPS * 32)[:, None]
    lane, warp = i % 32, i // 32
    g, t = lane // 4, lane % 4
    row_lo = tl.program_id(0) * (16 * TILES) + (warp % TILES) * 16 + g
    r_lo = tl.minimum(row_lo, N - 1).to(tl.int64)  # rows past N read row N - 1; their outputs are not stored
    r_hi = tl.minimum(row_lo + 8, N - 1).to(tl.int64)
    # words 2t and 2t + 1 of each 8-word chunk of a row: one 8-byte load (the words viewed as int64); the hints
    # keep a row's 4 lanes from being merged into one thread's vector, which would change the tiles' layout
    t_words = tl.max_contiguous(t, [1, 1])
    w_lo, w_hi = q_ptr + r_lo * stride_qn + t_words, q_ptr + r_hi * stride_qn + t_words
    c_lo, c_hi = c_ptr + r_lo * stride_cn, c_ptr + r_hi * stride_cn
    # x as uint32 bf16 pairs: lane (g, t)'s B fragments are x's row g; word 2t + v of a chunk holds columns
    # 32 (t // 2) + 4 j + 2 (t % 2) + v (slot j), so x's pair at 16 (t // 2) + 2 j + t % 2 holds it in half v
    x_row = x_ptr + g * stride_xm + tl.max_contiguous(16 * (t // 2) + t % 2, [1, 1])
    x_valid = g < M
    units = K // (FLUSH_CHUNKS * CHUNK)
    per_warp = tl.cdiv(units, SPLIT)
    first = (warp // TILES) * per_warp
    ones = tl.full([WARPS * 32, 1], BF16_ONES, tl.uint32)
    zeros = tl.zeros([WARPS * 32, UNROLL], tl.float32)
    acc0 = tl.zeros([WARPS * 32], tl.float32)
    acc1, acc2, acc3 = acc0, acc0, acc0
    wait_for_inputs(USE_PDL)
    for it in range(0, per_warp, UNROLL):
        unit = first + it + tl.arange(0, UNROLL)[None, :]
        valid = (unit < units) & (unit < first + per_warp)
        d0, d1, d2, d3, s0, s1, s2, s3 = zeros, zeros, zeros, zeros, zeros, zeros, zeros, zeros
        for f in tl.static_range(FLUSH_CHUNKS):
            chunk = unit * FLUSH_CHUNKS + f
            lo0, lo1 = _words(w_lo + chunk * 4, valid)
            hi0, hi1 = _words(w_hi + chunk * 4, valid)
            d0, d1, d2, d3, s0, s1, s2, s3 = _chunk(lo0, lo1, hi0, hi1, x_row + chunk * 32, valid & x_valid,
                                                    d0, d1, d2, d3, s0, s1, s2, s3, ones, UNROLL, WARPS, INTERPRET)
        # sum (128 + c - z) s x over a unit = s (D - 128 X) - z s X, coefficients (2**48 s, -z s) per row
        group = (unit * (FLUSH_CHUNKS * CHUNK)) // GROUP_COLS
        a_lo = tl.load(c_lo + group * 2, mask=valid, other=0.0) * 2.0 ** -PRODUCT_SHIFT
        z_lo = tl.load(c_lo + group * 2 + 1, mask=valid, other=0.0)
        a_hi = tl.load(c_hi + group * 2, mask=valid, other=0.0) * 2.0 ** -PRODUCT_SHIFT
        z_hi = tl.load(c_hi + group * 2 + 1, mask=valid, other=0.0)
        acc0 += tl.sum(a_lo * (d0 - 128.0 * s0) + z_lo * s0, axis=1)
        acc2 += tl.sum(a_hi * (d2 - 128.0 * s0) + z_hi * s0, axis=1)
        if ROWS > 1:
            acc1 += tl.sum(a_lo * (d1 - 128.0 * s1) + z_lo * s1, axis=1)
            acc3 += tl.sum(a_hi * (d3 - 128.0 * s1) + z_hi * s1, axis=1)
    # sum each tile's SPLIT warps; lane (g, t) holds rows g and g + 8, x's rows 2t and 2t + 1
    _store_tiles(y_ptr, b_ptr, acc0, acc2, 0, M, N, stride_ym, HAS_BIAS, TILES, SPLIT)
    if ROWS > 1:
        _store_tiles(y_ptr, b_ptr, acc1, acc3, 1, M, N, stride_ym, HAS_BIAS, TILES, SPLIT)


@triton.jit
def _store_tiles(y_ptr, b_ptr, acc_lo, acc_hi, X_COL: tl.constexpr, M, N, stride_ym, HAS_BIAS: tl.constexpr,
                 TILES: tl.constexpr, SPLIT: tl.constexpr):
    """The [WARPS * 32] accumulators of rows g / g + 8 and x's row 2t + X_COL, summed over each tile's SPLIT
    warps, into y."""
    j = tl.arange(0, TILES * 32)
    rows = tl.program_id(0) * (16 * TILES) + (j // 32) * 16 + (j % 32) // 4
    x_col = 2 * (j % 4) + X_COL
    _store(y_ptr, b_ptr, tl.sum(tl.reshape(acc_lo, [SPLIT, TILES * 32]), axis=0), rows, x_col, M, N, stride_ym,
           HAS_BIAS)
    _store(y_ptr, b_ptr, tl.sum(tl.reshape(acc_hi, [SPLIT, TILES * 32]), axis=0), rows + 8, x_col, M, N,
           stride_ym, HAS_BIAS)


@triton.jit
def _store(y_ptr, b_ptr, y, rows, x_col, M, N, stride_ym, HAS_BIAS: tl.constexpr):
    """y[x_col, rows] (+ bias[rows]) where both exist."""
    if HAS_BIAS:
        y += tl.load(b_ptr + rows, mask=rows < N, other=0.0).to(tl.float32)
    tl.store(y_ptr + x_col * stride_ym + rows, y.to(y_ptr.dtype.element_ty), mask=(x_col < M) & (rows < N))


def int4_mma_gemv(x: torch.Tensor, words: torch.Tensor, coeffs: torch.Tensor, bias: torch.Tensor | None,
                  group_size: int, tiles: int | None = None, split: int | None = None,
                  unroll: int | None = None) -> torch.Tensor:
    """x [..., K] (bf16, 1-8 rows) @ dequantize(weight).T (+ bias) from INT4 `interleave_codes` words and
    `gemv_coefficients` (see `mma_gemv_supported`). The knobs are for benchmarks/int4_tinygemm_bench.py."""
    n, k = words.shape[0], x.shape[-1]
    tiles, split, unroll = [given or default for given, default in zip((tiles, split, unroll), knobs_for(k))]
    x2 = x.reshape(-1, k)
    pairs_ok = x2.stride(-1) == 1 and x2.stride(0) % 2 == 0 and x2.storage_offset() % 2 == 0  # viewable as int32
    x2 = x2 if pairs_ok else x2.contiguous()
    rows = x2.shape[0]
    y = torch.empty(rows, n, dtype=x.dtype, device=x.device)
    flush = flush_columns(group_size)
    _int4_mma_gemv_kernel[(triton.cdiv(n, 16 * tiles),)](
        x2.view(torch.int32), words.view(torch.int64), coeffs, bias if bias is not None else coeffs, y, rows, n, k,
        x2.stride(0) // 2, words.stride(0) // 2, coeffs.stride(0), y.stride(0),
        GROUP_COLS=k if group_size == -1 else group_size, FLUSH_CHUNKS=flush // CHUNK.value,
        HAS_BIAS=bias is not None, ROWS=triton.next_power_of_2(rows), TILES=tiles, SPLIT=split,
        UNROLL=unroll, INTERPRET=not x.is_cuda, num_warps=tiles * split, num_stages=1, **pdl_launch(x.device),
    )
    return y.view(*x.shape[:-1], n)
