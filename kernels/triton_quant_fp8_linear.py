"""Triton backend of `autodeploy::fp8_linear` (FP8 W8A8), the `fp8_linear_triton` op.

A few rows (decode): x quantized once by kernels/triton_fp8_act_quant.py (per token, per tensor, static or per
token-group scales), then a skinny kernel that streams the e4m3 weight once (1 byte per weight, half of bf16).
The skinny kernel can also find the rows' scales itself in one pass over x and quantize as it walks K
(`skinny_fp8_linear` without `x_scale`: the benchmarks' and tests' form; each of its programs reads all of x,
which made per-tensor scales half as fast as per token at batch 64).
e4m3 values are exact in fp16, so the product runs as an fp16 tl.dot with float32 accumulation: the
same sums as an e4m3 tensor-core GEMM, without its minimum tile sizes. PDL and the L2 prefetch follow
kernels/triton_linear.py, but are off by default (FP8_DOT_PDL).
More rows on sm_89+ (Ada, Hopper): cuBLASLt's FP8 GEMM through `torch._scaled_mm` (row-wise scales:
[M, 1] for x, [1, N] for w; bf16 out, which row-wise scaling requires in torch 2.11). Elsewhere the
reference.
Activation scales per token and group of columns (`act_quant="group"`, [M, G]) always go through the dot
on x quantized beforehand, with the K tile cut to divide the group: each K step multiplies its tile into a
fresh accumulator, scales that by the rows' scale of the step's group (one [M] load) and adds it, the
per-channel weight scale staying in the epilogue (DeepSeek-V3's promotion of partial sums). Since each step
then waits for its MMA, a program's time follows its number of K steps, and N = 4096 makes only 64 tiles
for 132 SMs: up to QUANTIZED_X_ROWS, K is split over programs (float32 partials; the tile's last program to
arrive, counted by an atomic, adds them in split order and stores y: one kernel, the same y every call).
On an H200 at batch 1 this took the 4096 x 14336 down projection from 37.3 to ~21 us. From 4 rows cuBLASLt's
1 x 128 block-scaled GEMM takes groups of 128 where it exists; elsewhere past QUANTIZED_X_ROWS the same kernel
tiles the rows (no swap), since row-wise `_scaled_mm` cannot take them. Group scales load a step ahead of their
MMA: loads that feed no dot are not staged by Triton's pipeliner, and waiting for them cost up to 13 % at 64 rows.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .quant_format import FP8_DTYPE
from .quant_act import kernel_groups
from .quant_linear import ACT_GROUP_SIZE, ACT_QUANT, activation_scale, quantize_activation
from .triton_fp8 import activation_scales, saturate_e4m3, store_scaled
from .triton_fp8_act_quant import quantize_fp8_per_token, quantize_rows_fp8, quantize_tensor_fp8
from .triton_linear import PREFETCH_K
from .triton_fp8_gemv import fp8_gemv, fp8_gemv_supported
from .triton_pdl import pdl_launch, prefetch_l2, wait_for_inputs
from .triton_split_k import k_range, split_launch, splits_for, sum_splits
from .weight_scale_layout import weight_scale_layout

BLOCK_N = 32
BLOCK_K = 512
NUM_WARPS = 4
NUM_STAGES = 4
SWAP = False
# Rows up to here with per-token activation scales take `prequantized_fp8_linear`; its (block_n, block_k, warps,
# stages) from benchmarks/quant_knob_sweep.py --given on an H200 (BENCHMARKS.md), swept with per-token scales
# (group activation scales take GROUP_KNOBS below). Wide at 17-64 rows: the 8B gate_up at 64 rows 33.7 us with
# (256, 128, 8, 4) against 35.0 with (128, 128, 4, 6) (session 20).
QUANTIZED_X_ROWS = 64
QUANTIZED_X_WIDE_N = 8192
QUANTIZED_X_KNOBS = {  # (more than 16 rows, more than QUANTIZED_X_WIDE_N outputs) -> knobs
    (False, False): (64, 256, 4, 6), (False, True): (128, 256, 4, 5),
    (True, False): (64, 256, 4, 4), (True, True): (256, 128, 8, 4),
}
# More than 16 rows and K past this: (block_n, block_k, warps, stages, split_k). H200, 64 rows, the 8B down
# projection (4,096 x 14,336: 64 tiles of 64 outputs, each with 112 K steps): 20.9 us split in two against 23.3
# whole; qkv and o (K = 4,096) lose split (BENCHMARKS.md session 20).
QUANTIZED_X_LONG_K = 8192
QUANTIZED_X_LONG_K_KNOBS = (64, 128, 4, 6, 2)
# Rows beyond QUANTIZED_X_ROWS with group activation scales: (block_m, block_n, block_k, warps, stages) of the
# tiled dot: the best at 2,048 rows on every Llama-3.1-8B shape (H200, benchmarks/quant_knob_sweep.py).
TILED_KNOBS = (128, 128, 128, 8, 3)
# With groups of 128, cuBLASLt's block-scaled GEMM takes row counts that are multiples of this: on an H200 it
# passed the reference at 300 rows (and ran the 8B prefills) but failed at 65.
BLOCKWISE_ROWS_MULTIPLE = 4
# ... and from this many rows up also below QUANTIZED_X_ROWS. H200, us for the 8B qkv / o / gate_up / down
# (BENCHMARKS.md session 18): at 64 rows 10.4 / 8.2 / 35.1 / 19.4 against the group-scaled dot's best knobs 13.9 /
# 11.7 / 37.5 / 25.9 (its K steps each wait for their MMA); at 16 rows 10.1 / 7.7 / 32.2 / 20.9 against the dot's
# defaults 11.6 / 10.1 / 35.8 / 20.3; at 4 rows 10.0 / 7.6 / 31.4 / 20.3 against 10.7 / 8.7 / 33.6 / 19.1; at one
# row the GEMV wins everywhere.
BLOCKWISE_MIN_ROWS = 4
# FP8 block weights (one scale per 128 x 128 tile) from this many rows take cuBLASLt's 1 x 128 x 128 x 128 GEMM on
# the compact block scales; fewer take the 1 x 128 one with the blocks repeated over their rows. H200 (BENCHMARKS.md
# sessions 20-21, benchmarks/fp8_block_gemm_bench.py --rows): the 128 x 128 kernel takes 0.80-0.85x the 1 x 128
# one's time on the 8B shapes at 1,024-8,192 rows, 0.65-1.0x at 256 (qkv 15.8 / 24.3 us, o 15.4 / 15.5, gate_up
# 65.3 / 78.8, down 43.5 / 46.3), and 1.0-2.0x at 64 (slower everywhere).
BLOCK_WEIGHT_ROWS = 256
# The same up to QUANTIZED_X_ROWS with group activation scales (K steps of one group, so no block_k), and its
# split-K (see split_k_for); from benchmarks/quant_knob_sweep.py --given --group 128 on an H200 (BENCHMARKS.md).
GROUP_KNOBS = {(False, False): (64, 4, 6), (False, True): (64, 4, 4), (True, False): (64, 4, 6),
               (True, True): (128, 4, 4)}  # -> (block_n, warps, stages)
SPLIT_K_PROGRAMS_PER_SM, SPLIT_K_MIN_STEPS, SPLIT_K_MAX = 3, 4, 8
# Whether the dot launches with PDL (kernels/triton_pdl.py). Off: on an H200, FP8 (group scales) batch 1 of the 8B
# shape ran 320.9 tok/s with this kernel launched plainly and every other kernel with PDL, 296.3 with PDL on all
# (315.3 with only the split-K launches plain, 319.7 with PDL off everywhere; batch 64 unchanged). Why the early
# launch costs it was not found; the bf16 and INT4 kernels gain from PDL.
FP8_DOT_PDL = False
# Rows of quantized x up to which the GEMV (kernels/triton_fp8_gemv.py) runs instead of the dot. H200, the 8B layer's
# four linears with group scales (benchmarks/fp8_gemv_bench.py, BENCHMARKS.md session 15): the GEMV 63.6 / 72.3 us
# at 1 / 2 rows, the dot 69.4 / 70.3.
FP8_GEMV_ROWS = 1
_ACT_MODES = {"static": 0, "token": 1, "tensor": 2, "given": 3}


@triton.jit
def _skinny_fp8_kernel(
    x_ptr, w_ptr, ws_ptr, xs_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym, stride_xsm, stride_xsg,
    ACT: tl.constexpr, W_PER_CHANNEL: tl.constexpr, HAS_BIAS: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SWAP: tl.constexpr,
    X_GROUP: tl.constexpr = 0, SPLIT_K: tl.constexpr = 1, part_ptr=None, count_ptr=None,
    USE_PDL: tl.constexpr = False, PREFETCH_K: tl.constexpr = 0, W_BLOCK: tl.constexpr = False, stride_wsn=0,
):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    n_valid = offs_n < N
    m_valid = offs_m < M
    k_start, k_end = k_range(K, BLOCK_K, SPLIT_K)
    w_rows = w_ptr + tl.where(n_valid, offs_n, 0)[:, None].to(tl.int64) * stride_wn
    if PREFETCH_K > 0:  # one address per 128-byte line (1-byte weights)
        prefetch_l2(w_rows + tl.minimum(k_start + tl.arange(0, PREFETCH_K // 128)[None, :] * 128, K - 1))
    wait_for_inputs(USE_PDL)
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm
    xs_rows = xs_ptr + offs_m * stride_xsm
    if X_GROUP > 0:  # x is already e4m3 with a scale per row and group of X_GROUP columns: applied per K step
        sx = tl.full([BLOCK_M], 1.0, tl.float32)
    elif ACT == 3:  # x is already e4m3, its per-row scales at xs_ptr
        sx = tl.load(xs_rows, mask=m_valid, other=1.0)
    else:
        sx = activation_scales(x_rows, xs_ptr, m_valid, K, ACT, BLOCK_M, BLOCK_K)
    if SWAP:  # weights as the MMA's A operand (M = BLOCK_N >= 64 takes Hopper's wgmma), rows as its N
        acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    if X_GROUP > 0:  # group scales load a step ahead: the pipeliner stages only the dot's operands
        sxg_next = tl.load(xs_rows + (k_start // X_GROUP) * stride_xsg, mask=m_valid, other=0.0)
    if W_BLOCK:  # the weight's scales per X_GROUP x X_GROUP block: each output row's for the step's group
        ws_rows = ws_ptr + (tl.where(n_valid, offs_n, 0) // X_GROUP) * stride_wsn
        swg_next = tl.load(ws_rows + k_start // X_GROUP, mask=n_valid, other=0.0)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_valid = offs_k < k_end
        w = tl.load(w_rows + offs_k[None, :], mask=n_valid[:, None] & k_valid[None, :], other=0.0)
        x = tl.load(x_rows + offs_k[None, :], mask=m_valid[:, None] & k_valid[None, :], other=0.0)
        if ACT == 3:
            qx = x.to(tl.float32) if INTERPRET else x
        else:
            qx = saturate_e4m3(x.to(tl.float32) / sx[:, None], INTERPRET)
        if INTERPRET:  # float32 (the interpreter's low-precision dots are wrong): the same values
            w = w.to(tl.float32)
        if X_GROUP > 0:  # BLOCK_K divides X_GROUP: this step's columns share one scale per row
            sxg = sxg_next
            next_group = tl.minimum((k0 + BLOCK_K) // X_GROUP, (K - 1) // X_GROUP)
            sxg_next = tl.load(xs_rows + next_group * stride_xsg, mask=m_valid, other=0.0)
            if SWAP:
                step = tl.dot(w, tl.trans(qx)) * sxg[None, :]
            else:
                step = tl.dot(qx, tl.trans(w)) * sxg[:, None]
            if W_BLOCK:
                swg = swg_next
                swg_next = tl.load(ws_rows + next_group, mask=n_valid, other=0.0)
                step = step * (swg[:, None] if SWAP else swg[None, :])
            acc += step
        elif SWAP:
            acc = tl.dot(w, tl.trans(qx), acc)
        else:
            acc = tl.dot(qx, tl.trans(w), acc)
    if SWAP:
        acc = tl.trans(acc)
    if SPLIT_K > 1:  # float32 partials; the tile's last split to arrive adds them up and stores y
        acc, last = sum_splits(acc, part_ptr, count_ptr, offs_m, offs_n, m_valid[:, None] & n_valid[None, :], M, N,
                               SPLIT_K)
        store_scaled(acc, sx, ws_ptr, b_ptr, y_ptr, offs_m, offs_n, m_valid & last, n_valid, stride_ym,
                     W_PER_CHANNEL, HAS_BIAS, W_BLOCK)
    else:
        store_scaled(acc, sx, ws_ptr, b_ptr, y_ptr, offs_m, offs_n, m_valid, n_valid, stride_ym,
                     W_PER_CHANNEL, HAS_BIAS, W_BLOCK)


def skinny_fp8_linear(x, weight, weight_scale, input_scale=None, bias=None, act_quant="token",
                      block_n: int = BLOCK_N, block_k: int = BLOCK_K, num_warps: int = NUM_WARPS,
                      num_stages: int = NUM_STAGES, swap: bool = SWAP, x_scale: torch.Tensor | None = None,
                      out_dtype: torch.dtype | None = None, x_group: int = -1, block_m: int | None = None,
                      split_k: int = 1) -> torch.Tensor:
    """fp8_linear with all rows of x in one tile (meant for a few). With `x_scale` (float32 [M, G]) x is
    already e4m3 (quantized by whoever produced it: per row, or per group of `x_group` columns, a power of two
    that the K tile is then cut to divide), `out_dtype` names y's dtype, and `block_m` rows per tile may tile
    many rows. `split_k` programs share each output tile's K (float32 partials, summed by the last to finish).
    A 2-D weight_scale holds one scale per x_group x x_group block of the weight, applied per K step with x's.
    The knobs are for benchmarks/quant_knob_sweep.py."""
    if input_scale is None and act_quant not in ACT_QUANT:
        raise ValueError(f"act_quant must be one of {ACT_QUANT}, not {act_quant!r}")
    w_block = weight_scale.dim() == 2
    if w_block and (x_scale is None or x_group <= 0):
        raise ValueError("FP8 block weight scales need x quantized beforehand in groups of the block's size")
    n, k = weight.shape
    x2 = x.reshape(-1, k)
    x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    weight_scale = weight_scale.float().contiguous()
    rows = x2.shape[0]
    y = torch.empty(rows, n, dtype=out_dtype or x.dtype, device=x.device)
    launch = pdl_launch(x.device, enabled=FP8_DOT_PDL)
    prefetch = min(triton.next_power_of_2(PREFETCH_K * 2), triton.next_power_of_2(k)) if launch["USE_PDL"] else 0
    launch["PREFETCH_K"] = prefetch if prefetch >= 128 else 0
    grouped = x_scale is not None and (x_scale.shape[-1] > 1 or w_block)
    if x_scale is not None:
        act, xs = "given", x_scale.float().reshape(rows, -1)  # any strides (the producers' are group-major)
    else:
        act = "static" if input_scale is not None else act_quant
        xs = input_scale.float().reshape(1) if input_scale is not None else weight_scale
    block_m = min(block_m or rows, rows) if act == "given" else rows  # scales found in the kernel need every row
    block_k = min(block_k, x_group) if grouped else block_k
    grid = (triton.cdiv(n, block_n), triton.cdiv(rows, block_m))
    split = split_launch(split_k, grid[0] * grid[1], triton.cdiv(k, block_k), rows, n, x.device)
    _skinny_fp8_kernel[grid + (split["SPLIT_K"],)](
        x2, weight, weight_scale, xs, bias if bias is not None else weight_scale, y, rows, n, k,
        x2.stride(0), weight.stride(0), y.stride(0), *(xs.stride() if xs.dim() == 2 else (0, 0)),
        ACT=_ACT_MODES[act], W_PER_CHANNEL=weight_scale.dim() == 1, HAS_BIAS=bias is not None,
        INTERPRET=not x.is_cuda, BLOCK_M=max(16, triton.next_power_of_2(block_m)), BLOCK_N=block_n,
        BLOCK_K=block_k, SWAP=swap, X_GROUP=x_group if grouped else 0, num_warps=num_warps, num_stages=num_stages,
        **({"W_BLOCK": True, "stride_wsn": weight_scale.stride(0)} if w_block else {}), **split, **launch,
    )
    return y.view(*x.shape[:-1], n)


@functools.cache
def _has_blockwise_fp8_gemm(index: int) -> bool:
    cuda = tuple(int(v) for v in (torch.version.cuda or "0.0").split(".")[:2])
    return torch.cuda.get_device_capability(index) == (9, 0) and cuda >= (12, 9)


@functools.cache
def _has_fp8_gemm(index: int) -> bool:
    return torch.cuda.get_device_capability(index) >= (8, 9)


def _scaled_mm(q2: torch.Tensor, scale_a: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
               bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """cuBLASLt e4m3 x e4m3 with row-wise scales (scale_a [M, 1]; the weight's per-channel or per-tensor scale
    as [1, N]), bf16 out (which row-wise scaling requires in torch 2.11), then out_dtype."""
    scale_b = weight_scale_layout(weight_scale, 1, weight.shape[0])
    if out_dtype == torch.bfloat16:  # cuBLASLt adds the bias and writes bf16 itself
        return torch._scaled_mm(q2, weight.t(), scale_a=scale_a, scale_b=scale_b,
                                bias=bias.to(out_dtype) if bias is not None else None, out_dtype=torch.bfloat16)
    y = torch._scaled_mm(q2, weight.t(), scale_a=scale_a, scale_b=scale_b, out_dtype=torch.bfloat16)
    y = y.float() + bias.float() if bias is not None else y
    return y.to(out_dtype)


def blockwise_scaled_mm(q2: torch.Tensor, scale2: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                        bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """cuBLASLt's e4m3 GEMM with 1 x 128 block scales on both sides (CUDA 12.9+, sm_90): x's per-token-group
    scales [M, K / 128] as they are, the weight's per-channel (or per-tensor) scale repeated over its K blocks.
    Both scale tensors go in outer-dim-major (stride 1 along M, and along N), as cuBLASLt's block scaling reads
    them: x's as the quantizing kernels store them (quant_act.empty_scales; others are transposed here), the
    weight's expanded once (kernels/weight_scale_layout.py)."""
    scale_a = scale2.float().t().contiguous().t()  # [M, K/128], stride (1, M): a view of group-major scales
    if weight_scale.dim() == 2 and q2.shape[0] >= BLOCK_WEIGHT_ROWS and weight_scale.shape[1] % 4 == 0:
        scale_b = weight_scale.float().t()  # [K/128, N/128], stride (1, K/128): the 128 x 128 kernel
    else:
        scale_b = weight_scale_layout(weight_scale, scale2.shape[-1], weight.shape[0])  # [K/128, N], stride (N, 1)
    y = torch._scaled_mm(q2.contiguous(), weight.t(), scale_a=scale_a, scale_b=scale_b, out_dtype=torch.bfloat16)
    if bias is not None:
        y = y.float() + bias.float()
    return y.to(out_dtype)


def scaled_mm_fp8_linear(x, weight, weight_scale, input_scale=None, bias=None, act_quant="token") -> torch.Tensor:
    """Many rows: quantize x (per token: one kernel instead of torch's five), then cuBLASLt's FP8 GEMM."""
    n, k = weight.shape
    x2 = x.reshape(-1, k)
    x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
    if input_scale is None and act_quant == "token":
        qx, scale_a = quantize_rows_fp8(x2)
    else:
        sx = activation_scale(x2, input_scale, act_quant)
        qx, scale_a = quantize_activation(x2, sx), sx.expand(x2.shape[0], 1).contiguous()
    return _scaled_mm(qx, scale_a, weight, weight_scale, bias, x.dtype).view(*x.shape[:-1], n)


def given_fp8_linear(q2: torch.Tensor, scale2: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                     bias: torch.Tensor | None, out_dtype: torch.dtype, group_size: int = -1) -> torch.Tensor:
    """The e4m3 x e4m3 GEMM on x [M, K] quantized beforehand (scale [M, G]): up to FP8_GEMV_ROWS rows the GEMV; up to
    QUANTIZED_X_ROWS rows the Triton dot with the weights as the MMA's A operand (knobs from the sweep; group scales
    split K); with groups of 128 cuBLASLt's 1 x 128 block-scaled GEMM where it exists from BLOCKWISE_MIN_ROWS rows
    (H200, 2,048 rows: 532 us for gate_up against the Triton dot's 851), else the Triton dot in tiles of rows
    (TILED_KNOBS). (Per-row scales past QUANTIZED_X_ROWS go to cuBLASLt's row-wise GEMM in
    fp8_linear_quantized_input.) Block weight scales ([N / G, K / G]) take the same routes, cuBLASLt's 128 x 128 GEMM
    from BLOCK_WEIGHT_ROWS, and the dot and GEMV apply them per K group."""
    rows, (n, k) = q2.shape[0], weight.shape
    w_block = weight_scale.dim() == 2  # block weights: x's groups are the blocks' columns, even a single one
    grouped = scale2.shape[-1] > 1 or w_block
    if rows <= FP8_GEMV_ROWS and fp8_gemv_supported(rows, k, group_size if grouped else -1):
        return fp8_gemv(q2, scale2, weight, weight_scale, bias, out_dtype, group_size)
    if grouped and BLOCKWISE_MIN_ROWS <= rows and _blockwise_takes(q2, group_size, n, k):
        return blockwise_scaled_mm(q2, scale2, weight, weight_scale, bias, out_dtype)
    if rows <= QUANTIZED_X_ROWS and not grouped:
        split = 1
        if rows > 16 and k > QUANTIZED_X_LONG_K:
            block_n, block_k, warps, stages, split = QUANTIZED_X_LONG_K_KNOBS
        else:
            block_n, block_k, warps, stages = QUANTIZED_X_KNOBS[(rows > 16, n > QUANTIZED_X_WIDE_N)]
        return skinny_fp8_linear(q2, weight, weight_scale, None, bias, block_n=block_n, block_k=block_k,
                                 num_warps=warps, num_stages=stages, swap=True, x_scale=scale2, out_dtype=out_dtype,
                                 split_k=split)
    if rows <= QUANTIZED_X_ROWS:
        block_n, warps, stages = GROUP_KNOBS[(rows > 16, n > QUANTIZED_X_WIDE_N)]
        split = split_k_for(triton.cdiv(n, block_n), triton.cdiv(k, group_size), q2.device) if q2.is_cuda else 1
        return skinny_fp8_linear(q2, weight, weight_scale, None, bias, block_n=block_n, block_k=128,
                                 num_warps=warps, num_stages=stages, swap=True, x_scale=scale2, out_dtype=out_dtype,
                                 x_group=group_size, split_k=split)
    block_m, block_n, block_k, warps, stages = TILED_KNOBS
    return skinny_fp8_linear(q2, weight, weight_scale, None, bias, block_n=block_n, block_k=block_k, num_warps=warps,
                             num_stages=stages, swap=False, x_scale=scale2, out_dtype=out_dtype, x_group=group_size,
                             block_m=block_m)


def _blockwise_takes(q2: torch.Tensor, group_size: int, n: int, k: int) -> bool:
    """cuBLASLt's 1 x 128 block-scaled GEMM exists here and takes these shapes."""
    return (q2.is_cuda and group_size == 128 and q2.shape[0] % BLOCKWISE_ROWS_MULTIPLE == 0 and k % 128 == 0
            and n % 16 == 0 and _has_blockwise_fp8_gemm(q2.device.index or 0))


def split_k_for(tiles: int, k_steps: int, device: torch.device) -> int:
    """Splits of K per output tile of the group-scaled dot. Each K step of its promoted sums waits for its MMA,
    so a program's time grows with its steps rather than its bytes, and 64 tiles (N = 4096) leave half of an
    H200's SMs idle: split until there are SPLIT_K_PROGRAMS_PER_SM programs per SM, each keeping at least
    SPLIT_K_MIN_STEPS steps. (Per-token sums stream without waiting and stay whole.)"""
    return splits_for(tiles, k_steps, device, SPLIT_K_PROGRAMS_PER_SM, SPLIT_K_MIN_STEPS, SPLIT_K_MAX)


def fp8_linear_quantized_input(q: torch.Tensor, scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                               bias: torch.Tensor | None, out_dtype: torch.dtype, group_size: int = -1) -> torch.Tensor:
    """Same contract as `torch.ops.autodeploy.fp8_linear_quantized_input`: up to QUANTIZED_X_ROWS rows the Triton
    e4m3 x e4m3 dot; more rows with one scale per row cuBLASLt's FP8 GEMM with row-wise scales (sm_89+), with
    group scales the Triton dot in tiles of rows; else the reference."""
    n, k = weight.shape
    q2, scale2 = q.reshape(-1, k), scale.reshape(-1, scale.shape[-1]).float()
    rows = q2.shape[0]
    if q.is_cuda and rows and kernel_groups(group_size, k):
        per_row = scale2.shape[-1] == 1 and weight_scale.dim() < 2  # block weights: groups even when one
        if rows <= QUANTIZED_X_ROWS or not per_row:
            return given_fp8_linear(q2, scale2, weight, weight_scale, bias, out_dtype, group_size).view(*q.shape[:-1], n)
        if n % 16 == 0 and k % 16 == 0 and _has_fp8_gemm(q.device.index or 0):
            y = _scaled_mm(q2.contiguous(), scale2, weight, weight_scale, bias, out_dtype)
            return y.view(*q.shape[:-1], n)
    return torch.ops.autodeploy.fp8_linear_quantized_input(q, scale, weight, weight_scale, bias, out_dtype, group_size)


def prequantized_fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                            bias: torch.Tensor | None = None, group_size: int = -1,
                            input_scale: torch.Tensor | None = None) -> torch.Tensor:
    """fp8_linear with per-token scales (or per token and group of group_size columns, or a static input_scale, read
    as one scale per row): one kernel quantizes x's rows, the e4m3 GEMM reads them. Quantizing inside the dot (each
    program finding the rows' amax, then scaling every tile) costs more than this extra kernel: on an H200 the 28672 x
    4096 weight streams at 3.6 TB/s this way, 2.3 TB/s that way. (`fuse_fp8_act_quant` does the same in the graph, and
    folds the quantization into the RMSNorm.)"""
    group_size = group_size if input_scale is None else -1
    q, scale = quantize_fp8_per_token(x, group_size, input_scale)
    return fp8_linear_quantized_input(q, scale, weight, weight_scale, bias, x.dtype, group_size)


def fp8_linear(x, weight, weight_scale, input_scale=None, bias=None, act_quant="token",
               act_group_size=ACT_GROUP_SIZE) -> torch.Tensor:
    """The backend: per-token-group rows of any number, and up to QUANTIZED_X_ROWS rows with per-token, static or
    per-tensor scales (the tensor's found by one kernel, then applied as a static one), quantized once, then the
    e4m3 GEMV or dot; more rows `torch._scaled_mm` on sm_89+; else the reference."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if x.is_cuda and weight.dtype == FP8_DTYPE and rows > 0:
        if input_scale is None and act_quant == "group":
            return prequantized_fp8_linear(x, weight, weight_scale, bias, act_group_size)
        if input_scale is None and act_quant == "tensor" and 1 < rows <= QUANTIZED_X_ROWS:
            n, k = weight.shape
            q, scale = quantize_tensor_fp8(x.reshape(-1, k).contiguous())
            return fp8_linear_quantized_input(q, scale, weight, weight_scale, bias, x.dtype).view(*x.shape[:-1], n)
        per_row = input_scale is not None or act_quant == "token" or (act_quant == "tensor" and rows == 1)
        if rows <= QUANTIZED_X_ROWS and per_row:
            return prequantized_fp8_linear(x, weight, weight_scale, bias, input_scale=input_scale)
        n, k = weight.shape
        if n % 16 == 0 and k % 16 == 0 and _has_fp8_gemm(x.device.index or 0):
            return scaled_mm_fp8_linear(x, weight, weight_scale, input_scale, bias, act_quant)
    return torch.ops.autodeploy.fp8_linear(x, weight, weight_scale, input_scale, bias, act_quant, act_group_size)
