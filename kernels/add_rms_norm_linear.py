"""`autodeploy::add_rms_norm_linear`: linear(fused_add_rms_norm(x, residual, ...)[0], weight, bias), the residual
add + RMSNorm of a pre-norm layer with the projection that reads the normalized row (fused q/k/v, gate/up).

At batch-1 decode every kernel launch costs ~1.5-2 us and the norm's kernel moves only a few KB, so
`fuse_norm_linear` gives the pair one op, whose Triton backend normalizes the rows in the skinny GEMM as it
loads them: one launch instead of two. The op also returns x + residual, the next residual. The reference
composes the two canonical ops, so the numbers are theirs by definition.
"""

from __future__ import annotations

import torch

from .fused_add_rms_norm import fused_add_rms_norm
from .linear import linear

SCHEMA = ("(Tensor x, Tensor residual, Tensor norm_weight, float eps, Tensor weight, Tensor? bias) "
          "-> (Tensor, Tensor)")


@torch.library.custom_op("autodeploy::add_rms_norm_linear", mutates_args=(), schema=SCHEMA)
def add_rms_norm_linear(x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                        weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: (linear(normed), x + residual) from the canonical fused_add_rms_norm and linear."""
    normed, added = fused_add_rms_norm(x, residual, norm_weight, eps)
    return linear(normed, weight, bias), added


@add_rms_norm_linear.register_fake
def _(x, residual, norm_weight, eps, weight, bias):
    # The same composition on fake tensors: the two ops' fake impls give the shapes, dtypes and checks.
    normed, added = fused_add_rms_norm(x, residual, norm_weight, eps)
    return linear(normed, weight, bias), added
