"""Triton act(gate) * up (the `gated_act` backend), reading gate and up as strided row views.

After `fuse_shared_input_linears` the gate and up projections are one linear whose output
[..., 2I] is sliced into two views with row stride 2I; the kernel reads them in place, so the
fused projection's output never needs a copy. Separate, contiguous gate and up work the same way, and so do
alternating columns (GPT-OSS's `swigluoai` experts: column stride 2, which Triton does not specialize as it does 1).
The arithmetic (the activation rounded to the input dtype before the product, as the eager `act(gate) * up`
does) is `triton_activation.gated_product`, shared with the gated_linear prologue of the skinny GEMM.
Imported lazily: `triton.jit` fixes interpreter vs compiled mode when it decorates.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .gated_act import gated
from .quant_act import empty_quantized, kernel_groups
from .quant_linear import activation_groups
from .triton_activation import ACTIVATION_IDS, gated_product
from .triton_fp8 import store_tile_quantized
from .triton_layout import as_rows
from .triton_pdl import pdl_launch, wait_for_inputs

BLOCK = 1024
MAX_ROW_COLUMNS = 16384  # per-token scales: one program holds the whole row


@triton.jit
def _gated_act_kernel(
    gate_ptr, up_ptr, out_ptr, stride_g, stride_u, stride_o, n_cols, scale_ptr, stride_scale_m, stride_scale_g,
    stride_gc, stride_uc, ACTIVATION: tl.constexpr, BLOCK: tl.constexpr, QUANT_FP8: tl.constexpr = False, GROUP: tl.constexpr = 1,
    NUM_GROUPS: tl.constexpr = 1, INTERPRET: tl.constexpr = False, USE_PDL: tl.constexpr = False,
    static_ptr=None, STATIC: tl.constexpr = False,
):
    """Program (row, block of BLOCK columns), the block as a [BLOCK // GROUP, GROUP] tile: with QUANT_FP8 the
    product comes out as e4m3 with one scale per tile row (a group of GROUP columns, or the whole row when one
    block covers it), as quantize_fp8_per_token would quantize the unfused output."""
    wait_for_inputs(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK // GROUP)[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
    valid = cols < n_cols
    gate = tl.load(gate_ptr + row * stride_g + cols * stride_gc, mask=valid, other=0.0)
    up = tl.load(up_ptr + row * stride_u + cols * stride_uc, mask=valid, other=0.0)
    y = gated_product(gate, up, ACTIVATION).to(gate.dtype)
    if QUANT_FP8:
        groups = tl.program_id(1) * (BLOCK // GROUP) + tl.arange(0, BLOCK // GROUP)
        store_tile_quantized(y.to(tl.float32), out_ptr + row * stride_o + cols, valid,
                             scale_ptr + row * stride_scale_m + groups * stride_scale_g, groups < NUM_GROUPS, INTERPRET,
                             static_ptr, STATIC)
    else:
        tl.store(out_ptr + row * stride_o + cols, y.to(out_ptr.dtype.element_ty), mask=valid)


def _launch(gate: torch.Tensor, up: torch.Tensor, activation: str, group_size: int | None = None,
            input_scale: torch.Tensor | None = None):
    """act(gate) * up, or with `group_size` (quant_act's convention: -1 = one scale per row; with a static
    `input_scale`, that scale per row) (e4m3, scales)."""
    quant = group_size is not None
    out, scale = (empty_quantized(gate, group_size) if quant
                  else (torch.empty(gate.shape, dtype=gate.dtype, device=gate.device), None))
    gate2, up2 = as_rows(gate, unit_columns=False), as_rows(up, unit_columns=False)
    out2 = out.view(-1, gate.shape[-1])
    n_rows, n_cols = out2.shape
    if out.numel() == 0:
        return out if not quant else (out, scale)
    groups = 1 if not quant else scale.shape[-1]
    scale2 = scale.view(n_rows, groups) if quant else out2
    block = triton.next_power_of_2(n_cols) if quant and groups == 1 else max(BLOCK, group_size or 0)
    group = block if not quant or groups == 1 else group_size
    _gated_act_kernel[(n_rows, triton.cdiv(n_cols, block))](
        gate2, up2, out2, gate2.stride(0), up2.stride(0), out2.stride(0), n_cols, scale2, *scale2.stride(),
        gate2.stride(1), up2.stride(1),
        ACTIVATION=ACTIVATION_IDS[activation], BLOCK=block, QUANT_FP8=quant, GROUP=group, NUM_GROUPS=groups,
        INTERPRET=not gate.is_cuda, num_warps=min(max(block // 512, 4), 16), static_ptr=input_scale,
        STATIC=input_scale is not None, **pdl_launch(gate.device),
    )
    return out if not quant else (out, scale)


def _fused(gate: torch.Tensor, up: torch.Tensor) -> bool:
    return gate.shape == up.shape and gate.dtype == up.dtype  # broadcasting / mixed dtypes: not a fused case


def gated_act(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    """Same contract as `torch.ops.autodeploy.gated_act`, for gate and up of one shape and dtype."""
    if not _fused(gate, up):
        return gated(gate, up, activation)
    return _launch(gate, up, activation)


def gated_act_quant_fp8(gate: torch.Tensor, up: torch.Tensor, activation: str, group_size: int = -1,
                        input_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as `torch.ops.autodeploy.gated_act_quant_fp8`: (e4m3 act(gate) * up, float32 scale [..., G]).
    Groups the kernel does not take, and one scale over rows wider than MAX_ROW_COLUMNS, go to the reference."""
    whole_row = activation_groups(gate.shape[-1], group_size) == 1
    if (not _fused(gate, up) or not kernel_groups(group_size, gate.shape[-1])
            or (whole_row and gate.shape[-1] > MAX_ROW_COLUMNS)):
        return torch.ops.autodeploy.gated_act_quant_fp8(gate, up, activation, group_size, input_scale)
    return _launch(gate, up, activation, group_size, input_scale)
