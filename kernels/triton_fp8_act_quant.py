"""Per-token FP8 quantization of activations in one kernel, for the cuBLASLt FP8 GEMM (many rows).

In torch the dynamic scale and the cast are five kernels (abs, amax, divide, clamp, cast); at batch 64
that launch chain costs more than the GEMM it feeds. One program per row finds the row's amax, then
writes x / scale saturated to e4m3 and the scale, matching the reference op's rounding.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .quant_format import FP8_DTYPE
from .triton_fp8 import saturate_e4m3
from .triton_pdl import pdl_launch, wait_for_inputs

BLOCK_K = 1024


@triton.jit
def _quantize_rows_kernel(x_ptr, q_ptr, s_ptr, K, stride_xm, stride_qm, INTERPRET: tl.constexpr,
                          BLOCK_K: tl.constexpr, USE_PDL: tl.constexpr = False):
    wait_for_inputs(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    amax = tl.zeros([BLOCK_K], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + row * stride_xm + offs, mask=offs < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    scale = tl.maximum(tl.max(amax, axis=0) / 448.0, 1e-12)
    for k0 in range(0, K, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + row * stride_xm + offs, mask=offs < K, other=0.0).to(tl.float32)
        q = saturate_e4m3(x / scale, INTERPRET)
        tl.store(q_ptr + row * stride_qm + offs, q.to(q_ptr.dtype.element_ty), mask=offs < K)
    tl.store(s_ptr + row, scale)


def quantize_rows_fp8(x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (e4m3 [M, K], float32 per-row scale [M, 1]): the reference's per-token quantization."""
    m, k = x2.shape
    q = torch.empty(m, k, dtype=FP8_DTYPE, device=x2.device)
    scale = torch.empty(m, 1, dtype=torch.float32, device=x2.device)
    if m:
        _quantize_rows_kernel[(m,)](x2, q, scale, k, x2.stride(0), q.stride(0), INTERPRET=not x2.is_cuda,
                                    BLOCK_K=min(BLOCK_K, triton.next_power_of_2(k)), **pdl_launch(x2.device))
    return q, scale


def quantize_fp8_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as `torch.ops.autodeploy.quantize_fp8_per_token`: (e4m3 x, float32 scale [..., 1])."""
    q, scale = quantize_rows_fp8(x.reshape(-1, x.shape[-1]).contiguous())
    return q.view(x.shape), scale.view(*x.shape[:-1], 1)
