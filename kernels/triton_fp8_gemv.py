"""FP8 W8A8 GEMV for decode (one to four rows; faster than the dot at one) on activations quantized beforehand.

At one row the tensor-core dot (kernels/triton_quant_fp8_linear.py) pads x to 16 rows and, with a scale per group of
columns, waits for each K step's MMA before it can scale the partial sums: on an H200 the 8B layer's four linears took
69-75 us against the INT8 GEMV's 63 on the same bytes. Here each thread reads 16 consecutive bytes of a weight row
(one 16-byte load) and the 16 x values they meet, converts both to float32 (the hardware's e4m3 -> f16x2 conversion,
two weights an instruction, then one per weight to float32: ~3.1 instructions per weight with the FFMA at (8, 4),
sm_90 SASS) and sums the products in its registers: tiles are [blocks of 16 columns, rows of W, rows of x, column in
block], laid out alike for every load (the layout of kernels/triton_int_gemv.py), so nothing changes register layout
in the loop and K is reduced across threads once, at the end. A block never straddles an activation group (groups are
multiples of 16 columns), so each block's sum is scaled by its row's group scale as it is added, times the weight's
scale for its (row block, group) when the weights come in B x B blocks (B the group); a per-channel or per-tensor
weight scale and the bias come in the epilogue. The sums are those of the reference (e4m3 products in
float32), in another order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_pdl import pdl_launch, prefetch_first_lines, wait_for_inputs

MAX_ROWS = 4
BLOCK_COLS = 16  # one 16-byte load per weight row per K step
WIDE = 8192  # outputs up to which programs take 4 rows of W and 4 warps, past which 8 rows and 2 warps


def knobs_for(n: int) -> tuple[int, int]:
    """(block_n, num_warps): rows of W per program and its warps (all of them along K), from
    benchmarks/fp8_gemv_bench.py --knobs on an H200 at one row (BENCHMARKS.md, session 15): (4, 4) for Llama-3.1-8B's
    qkv, o and down (9.4 / 6.8 / 17.4 us), (8, 2) for gate_up (29.8 us); 63.4 us for the four, against 63.1 with each
    shape's best."""
    return (4, 4) if n <= WIDE else (8, 2)


def fp8_gemv_supported(rows: int, k: int, group_size: int) -> bool:
    """A few rows, K in whole 16-column blocks, activation groups of whole blocks (the last may be short) or one
    scale per row. Block weights need groups (their blocks')."""
    return 0 < rows <= MAX_ROWS and k % BLOCK_COLS == 0 and (group_size <= 0 or group_size % BLOCK_COLS == 0)


@triton.jit
def _fp8_gemv_kernel(
    q_ptr, xs_ptr, w_ptr, ws_ptr, b_ptr, y_ptr, M, N, K, stride_qm, stride_xsm, stride_xsg, stride_wn, stride_wsn,
    stride_ym, GROUP_BLOCKS: tl.constexpr, W_PER_CHANNEL: tl.constexpr, W_BLOCK: tl.constexpr,
    HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_PDL: tl.constexpr = False,
):
    COLS: tl.constexpr = 16  # BLOCK_COLS
    BLOCKS: tl.constexpr = BLOCK_K // COLS
    blk = tl.arange(0, BLOCKS)[:, None, None, None]
    col = tl.arange(0, COLS)[None, None, None, :]
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)[None, :, None, None]
    rows = tl.minimum(offs_n, N - 1).to(tl.int64)  # rows past N read row N - 1; their outputs are not stored
    w_cols = w_ptr + rows * stride_wn + blk * COLS + col
    if USE_PDL:  # the weights never depend on the previous kernel
        prefetch_first_lines(w_ptr + rows * stride_wn, BLOCK_K // 128, 128, K)
    wait_for_inputs(USE_PDL)
    offs_m = tl.arange(0, ROWS)[None, None, :, None]
    m_valid = offs_m < M
    x_cols = q_ptr + offs_m * stride_qm + blk * COLS + col
    m3 = tl.arange(0, ROWS)[None, None, :]
    xs_rows = xs_ptr + m3 * stride_xsm
    blk3 = tl.arange(0, BLOCKS)[:, None, None]
    ws_rows = ws_ptr
    if W_BLOCK > 0:
        ws_rows = ws_ptr + (tl.reshape(rows, [1, BLOCK_N, 1]) // W_BLOCK) * stride_wsn
    acc = tl.zeros([BLOCKS, BLOCK_N, ROWS], tl.float32)
    for step in range(0, tl.cdiv(K, BLOCK_K)):
        k0 = step * BLOCK_K
        if EVEN_K:
            w = tl.load(w_cols + k0)
        else:
            w = tl.load(w_cols + k0, mask=k0 + blk * COLS < K, other=0.0)
        x = tl.load(x_cols + k0, mask=m_valid & (k0 + blk * COLS < K), other=0.0)
        part = tl.sum(w.to(tl.float32) * x.to(tl.float32), axis=3)
        if GROUP_BLOCKS > 0:  # this step's blocks each lie in one activation group
            group = (k0 // COLS + blk3) // GROUP_BLOCKS
            scale = tl.load(xs_rows + group * stride_xsg, mask=(m3 < M) & (k0 + blk3 * COLS < K), other=0.0)
            if W_BLOCK > 0:  # the weight's block of these rows and this group
                scale = scale * tl.load(ws_rows + group, mask=k0 + blk3 * COLS < K, other=0.0)
            acc += part * scale
        else:
            acc += part
    y = tl.sum(acc, axis=0)  # [BLOCK_N, ROWS]
    offs_m2 = tl.arange(0, ROWS)[None, :]
    offs_n2 = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)[:, None]
    n_valid = offs_n2 < N
    if GROUP_BLOCKS == 0:  # one scale per row
        y *= tl.load(xs_ptr + offs_m2 * stride_xsm, mask=offs_m2 < M, other=0.0)
    if W_PER_CHANNEL:
        y *= tl.load(ws_ptr + offs_n2, mask=n_valid, other=0.0)
    elif W_BLOCK == 0:
        y *= tl.load(ws_ptr)
    if HAS_BIAS:
        y += tl.load(b_ptr + offs_n2, mask=n_valid, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs_m2 * stride_ym + offs_n2, y.to(y_ptr.dtype.element_ty), mask=(offs_m2 < M) & n_valid)


def fp8_gemv(q: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
             bias: torch.Tensor | None, out_dtype: torch.dtype, group_size: int = -1, block_n: int | None = None,
             num_warps: int | None = None) -> torch.Tensor:
    """(q [..., K] e4m3 with float32 scales x_scale [..., G]: one per row, or per group of `group_size` columns)
    @ (weight [N, K] e4m3 * weight_scale [N], [] or, in blocks of `group_size`, [N / group_size, G]).T (+ bias)
    in out_dtype (see `fp8_gemv_supported`). The knobs are for benchmarks."""
    n, k = weight.shape
    default_n, default_warps = knobs_for(n)
    block_n, num_warps = block_n or default_n, num_warps or default_warps
    q2 = q.reshape(-1, k)
    q2 = q2 if q2.stride(-1) == 1 else q2.contiguous()
    rows = q2.shape[0]
    xs = x_scale.reshape(rows, -1).float()  # any strides (the producers' are group-major)
    ws = weight_scale.float().contiguous()
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    y = torch.empty(rows, n, dtype=out_dtype, device=q.device)
    block_k = BLOCK_COLS * 32 * num_warps  # every warp along K: the loads' layout is the math's
    w_block = weight_scale.dim() == 2
    grouped = xs.shape[-1] > 1 or w_block  # block weights: x's groups are the blocks' columns, even a single one
    _fp8_gemv_kernel[(triton.cdiv(n, block_n),)](
        q2, xs, weight, ws, bias if bias is not None else ws, y, rows, n, k,
        q2.stride(0), *xs.stride(), weight.stride(0), ws.stride(0) if w_block else 0, y.stride(0),
        GROUP_BLOCKS=group_size // BLOCK_COLS if grouped else 0, W_PER_CHANNEL=weight_scale.dim() == 1,
        W_BLOCK=group_size if w_block else 0,
        HAS_BIAS=bias is not None, EVEN_K=k % block_k == 0, ROWS=triton.next_power_of_2(rows), BLOCK_N=block_n,
        BLOCK_K=block_k, num_warps=num_warps, num_stages=1, **pdl_launch(q.device),
    )
    return y.view(*q.shape[:-1], n)
