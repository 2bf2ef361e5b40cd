"""Triton act(gate) * up (the `gated_act` backend), reading gate and up as strided row views.

After `fuse_shared_input_linears` the gate and up projections are one linear whose output
[..., 2I] is sliced into two views with row stride 2I; the kernel reads them in place, so the
fused projection's output never needs a copy. Separate, contiguous gate and up work the same way.
The arithmetic (the activation rounded to the input dtype before the product, as the eager `act(gate) * up`
does) is `triton_activation.gated_product`, shared with the gated_linear prologue of the skinny GEMM.
Imported lazily: `triton.jit` fixes interpreter vs compiled mode when it decorates.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .gated_act import ACTIVATIONS
from .triton_activation import ACTIVATION_IDS, gated_product
from .triton_layout import as_rows
from .triton_pdl import pdl_launch, wait_for_inputs

BLOCK = 1024


@triton.jit
def _gated_act_kernel(
    gate_ptr, up_ptr, out_ptr, stride_g, stride_u, stride_o, n_cols,
    ACTIVATION: tl.constexpr, BLOCK: tl.constexpr, USE_PDL: tl.constexpr = False,
):
    wait_for_inputs(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    valid = cols < n_cols
    gate = tl.load(gate_ptr + row * stride_g + cols, mask=valid, other=0.0)
    up = tl.load(up_ptr + row * stride_u + cols, mask=valid, other=0.0)
    out = gated_product(gate, up, ACTIVATION)
    tl.store(out_ptr + row * stride_o + cols, out.to(out_ptr.dtype.element_ty), mask=valid)


def gated_act(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    """Same contract as `torch.ops.autodeploy.gated_act`, for gate and up of one shape and dtype."""
    if gate.shape != up.shape or gate.dtype != up.dtype:
        return ACTIVATIONS[activation](gate) * up  # broadcasting / mixed dtypes: not a fused case
    out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    gate2, up2, out2 = as_rows(gate), as_rows(up), out.view(-1, gate.shape[-1])
    n_rows, n_cols = out2.shape
    if out.numel() == 0:
        return out
    _gated_act_kernel[(n_rows, triton.cdiv(n_cols, BLOCK))](
        gate2, up2, out2, gate2.stride(0), up2.stride(0), out2.stride(0), n_cols,
        ACTIVATION=ACTIVATION_IDS[activation], BLOCK=BLOCK, **pdl_launch(gate.device),
    )
    return out

