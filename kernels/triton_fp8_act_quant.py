"""FP8 quantization of activations in one kernel: dynamic per token or per token and group of columns, or static.

In torch the dynamic scale and the cast are five kernels (abs, amax, divide, clamp, cast); at batch 64
that launch chain costs more than the GEMM it feeds. One program per row (per token) or per row and
group of columns (`group_size`: DeepSeek-V3 / vLLM's per-token-group scales, the last group short where
the size does not divide K) finds the span's amax, then writes x / scale saturated to e4m3 and the
scale, matching the reference op's rounding. A static scale (an FP8 checkpoint's input_scale) skips the amax.
One dynamic scale over every row (per tensor) is two launches of the row kernel: the rows' scales, then x
quantized by their largest (amax / 448 is monotone, so that is the tensor's scale bit for bit); each program of
one kernel reading all of x for the amax made per-tensor FP8 half as fast as per token at batch 64.
Groups of a power of two >= 16 columns go a tile of BLOCK_K columns (BLOCK_K / group_size groups) per program
instead: one 128-column group per program made a prompt step's quantization of the o projection's input
latency-bound (H200, 8,192 tokens x 4,096: 327 us a call, BENCHMARKS.md session 19).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .quant_act import empty_quantized, kernel_groups
from .triton_fp8 import saturate_e4m3, store_tile_quantized
from .triton_pdl import pdl_launch, wait_for_inputs

BLOCK_K = 1024


@triton.jit
def _quantize_rows_kernel(x_ptr, q_ptr, s_ptr, static_ptr, K, SPAN, stride_xm, stride_qm, stride_sm, stride_sg,
                          STATIC: tl.constexpr, INTERPRET: tl.constexpr, BLOCK_K: tl.constexpr,
                          USE_PDL: tl.constexpr = False, N_STATIC=1, SCALE_ONLY: tl.constexpr = False):
    """Program (row, group): columns [group * SPAN, min(group * SPAN + SPAN, K)), its scale at s[row, group]
    (with STATIC the largest of the N_STATIC at static_ptr, copied there; SCALE_ONLY: the scale alone)."""
    wait_for_inputs(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    group = tl.program_id(1)
    start = group * SPAN
    end = tl.minimum(start + SPAN, K)
    if STATIC:
        scale = tl.load(static_ptr).to(tl.float32)
        for i in range(1, N_STATIC):
            scale = tl.maximum(scale, tl.load(static_ptr + i).to(tl.float32))
    else:
        amax = tl.zeros([BLOCK_K], tl.float32)
        for k0 in range(start, end, BLOCK_K):
            offs = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + row * stride_xm + offs, mask=offs < end, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(x))
        scale = tl.maximum(tl.max(amax, axis=0) / 448.0, 1e-12)
    if not SCALE_ONLY:
        for k0 in range(start, end, BLOCK_K):
            offs = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + row * stride_xm + offs, mask=offs < end, other=0.0).to(tl.float32)
            q = saturate_e4m3(x / scale, INTERPRET)
            tl.store(q_ptr + row * stride_qm + offs, q.to(q_ptr.dtype.element_ty), mask=offs < end)
    tl.store(s_ptr + row * stride_sm + group * stride_sg, scale)


@triton.jit
def _quantize_groups_kernel(x_ptr, q_ptr, s_ptr, K, stride_xm, stride_qm, stride_sm, stride_sg,
                            GROUP: tl.constexpr, NUM_GROUPS: tl.constexpr, BLOCK_K: tl.constexpr,
                            INTERPRET: tl.constexpr, USE_PDL: tl.constexpr = False):
    """Program (row, tile): columns [tile * BLOCK_K, + BLOCK_K) as BLOCK_K / GROUP groups, each its own scale."""
    wait_for_inputs(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    groups = tl.program_id(1) * (BLOCK_K // GROUP) + tl.arange(0, BLOCK_K // GROUP)
    cols = groups[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
    valid = cols < K
    x = tl.load(x_ptr + row * stride_xm + cols, mask=valid, other=0.0).to(tl.float32)
    store_tile_quantized(x, q_ptr + row * stride_qm + cols, valid, s_ptr + row * stride_sm + groups * stride_sg,
                         groups < NUM_GROUPS, INTERPRET)


def quantize_rows_fp8(x2: torch.Tensor, group_size: int = -1,
                      input_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (e4m3 [M, K], float32 scale [M, G]): the reference's per-token (G = 1) or per-token-group
    quantization, or with a static `input_scale` (one value) x / input_scale, that scale repeated per row [M, 1]
    (what the e4m3 GEMMs on quantized x read)."""
    m, k = x2.shape
    q, scale = empty_quantized(x2, -1 if input_scale is not None else group_size)
    groups = scale.shape[-1]
    span = k if groups == 1 else group_size
    if not (m and k):
        return q, scale
    if groups > 1 and kernel_groups(group_size, k):
        block_k = max(BLOCK_K, group_size)
        _quantize_groups_kernel[(m, triton.cdiv(k, block_k))](
            x2, q, scale, k, x2.stride(0), q.stride(0), *scale.stride(), GROUP=group_size, NUM_GROUPS=groups,
            BLOCK_K=block_k, INTERPRET=not x2.is_cuda, **pdl_launch(x2.device))
    else:
        _quantize_rows_kernel[(m, groups)](
            x2, q, scale, input_scale if input_scale is not None else scale, k, span, x2.stride(0), q.stride(0),
            *scale.stride(), STATIC=input_scale is not None, INTERPRET=not x2.is_cuda,
            BLOCK_K=min(BLOCK_K, triton.next_power_of_2(span)), **pdl_launch(x2.device))
    return q, scale


def quantize_tensor_fp8(x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (e4m3 [M, K], float32 scale [M, 1]): the reference's dynamic per-tensor quantization (one amax
    over every row), that scale repeated per row as the e4m3 GEMMs read it."""
    m, k = x2.shape
    q, scale = empty_quantized(x2, -1)
    if not (m and k):
        return q, scale
    row_scales = torch.empty(m, dtype=torch.float32, device=x2.device)
    launch = dict(INTERPRET=not x2.is_cuda, BLOCK_K=min(BLOCK_K, triton.next_power_of_2(k)), **pdl_launch(x2.device))
    _quantize_rows_kernel[(m, 1)](x2, q, row_scales, row_scales, k, k, x2.stride(0), q.stride(0), 1, 0,
                                  STATIC=False, SCALE_ONLY=True, **launch)
    _quantize_rows_kernel[(m, 1)](x2, q, scale, row_scales, k, k, x2.stride(0), q.stride(0), *scale.stride(),
                                  STATIC=True, N_STATIC=m, **launch)
    return q, scale


def quantize_fp8_per_token(x: torch.Tensor, group_size: int = -1,
                           input_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as `torch.ops.autodeploy.quantize_fp8_per_token`: (e4m3 x, float32 scale [..., G])."""
    q, scale = quantize_rows_fp8(x.reshape(-1, x.shape[-1]).contiguous(), group_size, input_scale)
    return q.view(x.shape), scale.view(*x.shape[:-1], scale.shape[-1])
