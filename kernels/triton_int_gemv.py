"""INT4 / INT8 weight-only GEMV for decode (one to four rows) on its own weight layout.

At batch 1 a quantized linear is worth its fewer bytes only if unpacking costs fewer instructions than the
bytes take to arrive: about 4 lane-instructions per INT4 weight at an H200's issue rate and copy bandwidth
(8 per INT8 weight). The GEMV on our canonical layout (kernels/triton_quant_gemv.py) spends ~8 and converts the
unpacked tile between register layouts through shared memory every K step, because x for code slot j of
consecutive words sits 32 / BITS columns apart and gets a layout of its own (INT8 ran slower than bf16 that way).
This kernel reads the codes re-packed for it once at load, which then replace our canonical ones (past the
GEMV's rows the Triton backend reads them with x's columns gathered into `interleaved_columns` order):

- `interleave_codes`: in each block of 4 words (4 * 32 / BITS columns) word i holds column 4j + i in code
  slot j, so for slot j a thread's 4 words (one 16-byte load) meet 4 consecutive x values (one 8-byte load).
  Tiles are [blocks, rows of W, rows of x, word in block] and a thread sums over the last axis in its
  registers: no tile changes register layout in the loop (a reshape there cost 4 shared-memory round trips and
  barriers per K step);
- each code becomes a subnormal float32 by one AND where it already sits below the exponent (bits 0 .. 22;
  the rest after one shift of the word by 16), code * 2**(bit - 149), and meets x scaled by 2**(149 - bit - 48):
  AND + FFMA per weight, no int-to-float conversion;
- sum (code - zero) * x = 2**48 * part - zero * sum x per group, so `gemv_coefficients` stores (2**48 s,
  -zero s) in float32 per group and each thread's 4 words (one group) are scaled once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .quant_format import pack_int, unpack_int
from .triton_pdl import pdl_launch, prefetch_first_lines, wait_for_inputs

MAX_ROWS = 4
GEMV_BITS = (4, 8)
WORDS_PER_THREAD = 4  # one 16-byte load per row per K step; the interleave block
PRODUCT_SHIFT = tl.constexpr(48)  # code * x products are formed at 2**-48: normal for |x| in about 2**-78 .. 2**27
NARROW = 4096  # outputs up to which INT4 programs take 16 rows and 4 warps, past which 8 rows and 2 warps


def knobs_for(n: int, bits: int, rows: int = 1) -> tuple[int, int]:
    """(block_n, num_warps), the best of benchmarks/int4_tinygemm_bench.py / int8_gemv_bench.py --knobs on an
    H200 at one row (BENCHMARKS.md, session 14): INT4 (16, 4) for Llama-3.1-8B's o and down (N 4096), (8, 2) for
    qkv and gate_up; INT8 (8, 4) everywhere (within 4 % of each shape's best). Each row of x adds a thread's
    accumulators, and past 16 INT4 rows of W times rows of x ptxas spills them to local memory (sm_90 SASS; the
    8B o / down at 4 rows took 376 / 1,106 us, session 22), so INT4 takes fewer rows of W as x's rows grow."""
    if bits == 8:
        return 8, 4
    block_n, num_warps = (16, 4) if n <= NARROW else (8, 2)
    return max(4, min(block_n, 16 // triton.next_power_of_2(rows))), num_warps


def block_columns(bits: int) -> int:
    """Columns of one interleave block: a thread's 4 words."""
    return WORDS_PER_THREAD * 32 // bits


def interleave_codes(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """Canonical int32 words [N, K * bits / 32] (column (32 / bits) w + j in slot j) -> the GEMV's words: in each
    block of 4 words, word i holds column 4j + i of the block in slot j."""
    n, words = qweight.shape
    per_word = 32 // bits
    if words % WORDS_PER_THREAD:
        raise ValueError(f"interleave_codes needs K divisible by {block_columns(bits)}, got {words * per_word}")
    codes = unpack_int(qweight, bits, words * per_word).reshape(n, words // 4, per_word, 4)
    return pack_int(codes.transpose(-1, -2).reshape(n, words * per_word), bits)


def interleaved_columns(k: int, bits: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The interleaved words read as canonical ones hold the weight's columns in this order (int64 [K]): a kernel
    for the canonical layout computes x[..., columns] @ W.T from them, with the same groups (blocks never
    straddle one)."""
    per_word = 32 // bits
    b, i, j = torch.meshgrid(torch.arange(k // block_columns(bits)), torch.arange(4), torch.arange(per_word),
                             indexing="ij")
    return (b * block_columns(bits) + 4 * j + i).reshape(k).to(device)


def gemv_coefficients(scales: torch.Tensor, zeros: torch.Tensor | None, bits: int) -> torch.Tensor:
    """Per group (2**PRODUCT_SHIFT s, -zero s) in float32 [N, G, 2]; symmetric codes carry an implicit zero of
    2**(bits - 1)."""
    s = scales.float()
    z = zeros.float() if zeros is not None else torch.full_like(s, 2.0 ** (bits - 1))
    return torch.stack([s * 2.0 ** PRODUCT_SHIFT.value, -z * s], dim=-1).contiguous()


def gemv_tensors(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                 bits: int) -> dict[str, torch.Tensor]:
    """What the GEMV's ops keep in place of our canonical codes, by parameter-name suffix: the re-packed codes,
    their float32 coefficients and the column order the codes hold when read as canonical ones."""
    k = qweight.shape[1] * 32 // bits
    return {"gemv": interleave_codes(qweight, bits), "gemv_coeffs": gemv_coefficients(scales, zeros, bits),
            "gemv_columns": interleaved_columns(k, bits, qweight.device)}


def int_gemv_supported(rows: int, k: int, group_size: int, bits: int) -> bool:
    """A few rows, K in whole interleave blocks and groups of whole blocks (or one group per row)."""
    block = block_columns(bits) if bits in GEMV_BITS else 0
    return (block > 0 and 0 < rows <= MAX_ROWS and k % block == 0
            and (group_size == -1 or (group_size % block == 0 and k % group_size == 0)))


@triton.jit
def _x_scale(J: tl.constexpr, BITS: tl.constexpr):
    """What x is multiplied by for code J: 2**(149 - code offset - PRODUCT_SHIFT), the code offset being the bit
    where `_code_as_subnormal` leaves code J (its bit in the word, or 16 lower for the codes read from `high`)."""
    OFFSET: tl.constexpr = BITS * J if BITS * (J + 1) <= 23 else BITS * J - 16
    return 2.0 ** (149 - OFFSET - PRODUCT_SHIFT)


@triton.jit
def _code_as_subnormal(words, high, J: tl.constexpr, BITS: tl.constexpr):
    """Code J of each word as the subnormal float32 code * 2**(offset - 149) (offset: see `_x_scale`): one AND
    where the code already sits below the exponent (bits 0 .. 22), else one AND of `high` (the words shifted
    right by 16, one shift per word shared by its high codes). FFMA takes subnormals at full rate without
    flush-to-zero."""
    if BITS * (J + 1) <= 23:
        bits = words & (((1 << BITS) - 1) << (BITS * J))
    else:
        bits = high & (((1 << BITS) - 1) << (BITS * J - 16))
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _int_gemv_kernel(
    x_ptr, q_ptr, c_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_qn, stride_cn, stride_ym,
    BITS: tl.constexpr, GROUP_WORDS: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr, USE_PDL: tl.constexpr = False,
):
    PER_WORD: tl.constexpr = 32 // BITS
    WPT: tl.constexpr = 4  # WORDS_PER_THREAD: one interleave block (one group) per thread per K step
    BLOCKS: tl.constexpr = BLOCK_W // WPT
    words_per_row = K // PER_WORD
    # Tiles are [blocks, BLOCK_N, rows, word in block]: a thread holds its block's 4 words (one 16-byte load per
    # row) and the 4 consecutive x values they meet per code slot, and sums over the last axis in its registers.
    # No pointer is contiguous along the first three axes, so Triton spreads threads over axis 0 for every load
    # and no tile changes register layout in the loop.
    blk = tl.arange(0, BLOCKS)[:, None, None, None]
    word = tl.arange(0, WPT)[None, None, None, :]
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)[None, :, None, None]
    rows = tl.minimum(offs_n, N - 1).to(tl.int64)  # rows past N read row N - 1; their outputs are not stored
    q_words = q_ptr + rows * stride_qn + blk * WPT + word
    c_rows = c_ptr + tl.reshape(rows, [1, BLOCK_N, 1]) * stride_cn
    blk3 = tl.arange(0, BLOCKS)[:, None, None]
    if USE_PDL:  # the weights never depend on the previous kernel
        prefetch_first_lines(q_ptr + rows * stride_qn, BLOCK_W // 32, 32, words_per_row)
    wait_for_inputs(USE_PDL)
    offs_m = tl.arange(0, ROWS)[None, None, :, None]
    m_valid = offs_m < M
    x_blocks = x_ptr + offs_m * stride_xm + blk * (WPT * PER_WORD) + word
    acc = tl.zeros([BLOCKS, BLOCK_N, ROWS], tl.float32)
    for step in range(0, tl.cdiv(words_per_row, BLOCK_W)):
        w0 = step * BLOCK_W
        w_valid = w0 + blk * WPT < words_per_row  # whole blocks of 4 words
        if EVEN_K:
            words = tl.load(q_words + w0)
        else:
            words = tl.load(q_words + w0, mask=w_valid, other=0)
        words = words.to(tl.uint32, bitcast=True)
        high = words >> 16
        for j in tl.static_range(PER_WORD):
            if EVEN_K and ROWS == 1:
                x = tl.load(x_blocks + w0 * PER_WORD + 4 * j).to(tl.float32)
            else:
                x = tl.load(x_blocks + w0 * PER_WORD + 4 * j, mask=m_valid & w_valid, other=0.0).to(tl.float32)
            # code * 2**(offset - 149) * x * 2**(149 - offset - PRODUCT_SHIFT) = code * x * 2**-PRODUCT_SHIFT
            if j == 0:
                x_sum = x
                part = _code_as_subnormal(words, high, j, BITS) * (x * _x_scale(j, BITS))
            else:
                x_sum += x
                part += _code_as_subnormal(words, high, j, BITS) * (x * _x_scale(j, BITS))
        coeff = c_rows + ((w0 // WPT + blk3) // (GROUP_WORDS // WPT)) * 2
        if EVEN_K:
            a = tl.load(coeff)
            b = tl.load(coeff + 1)
        else:
            g_valid = w0 + blk3 * WPT < words_per_row
            a = tl.load(coeff, mask=g_valid, other=0.0)
            b = tl.load(coeff + 1, mask=g_valid, other=0.0)
        acc += a * tl.sum(part, axis=3) + b * tl.sum(x_sum, axis=3)
    y = tl.sum(acc, axis=0)
    offs_m2 = tl.arange(0, ROWS)[None, :]
    offs_n2 = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)[:, None]
    if HAS_BIAS:
        y += tl.load(b_ptr + offs_n2, mask=offs_n2 < N, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs_m2 * stride_ym + offs_n2, y.to(y_ptr.dtype.element_ty), mask=(offs_m2 < M) & (offs_n2 < N))


def int_gemv(x: torch.Tensor, words: torch.Tensor, coeffs: torch.Tensor, bias: torch.Tensor | None,
             group_size: int, bits: int, block_n: int | None = None, num_warps: int | None = None) -> torch.Tensor:
    """x [..., K] @ dequantize(weight).T (+ bias) from `interleave_codes` words and `gemv_coefficients`
    (see `int_gemv_supported`). The knobs are for benchmarks/int4_tinygemm_bench.py."""
    n, k = words.shape[0], x.shape[-1]
    x2 = x.reshape(-1, k)
    x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
    rows = x2.shape[0]
    default_n, default_warps = knobs_for(n, bits, rows)
    block_n, num_warps = block_n or default_n, num_warps or default_warps
    y = torch.empty(rows, n, dtype=x.dtype, device=x.device)
    block_w = WORDS_PER_THREAD * 32 * num_warps  # every warp along K: the loads' layout is the math's
    per_word = 32 // bits
    _int_gemv_kernel[(triton.cdiv(n, block_n),)](
        x2, words, coeffs, bias if bias is not None else coeffs, y, rows, n, k,
        x2.stride(0), words.stride(0), coeffs.stride(0), y.stride(0),
        BITS=bits, GROUP_WORDS=(k if group_size == -1 else group_size) // per_word, HAS_BIAS=bias is not None,
        EVEN_K=(k // per_word) % block_w == 0, ROWS=triton.next_power_of_2(rows), BLOCK_N=block_n, BLOCK_W=block_w,
        num_warps=num_warps, num_stages=1, **pdl_launch(x.device),
    )
    return y.view(*x.shape[:-1], n)
