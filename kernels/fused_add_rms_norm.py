"""`autodeploy::fused_add_rms_norm`: the residual add and the RMSNorm that follows it, as one op.

Every pre-norm decoder layer computes `h = x + residual; normed = rms_norm(h)` and keeps `h` as the
next residual. Unfused that is two passes over the activations (the add writes h, the norm reads it
again); a fused kernel reads x and residual once and writes both results. The op is functional
(returns the new residual instead of updating one in place) so the graph stays a plain dataflow.
"""

from __future__ import annotations

import torch

from .rms_norm import rms_norm

SCHEMA = "(Tensor x, Tensor residual, Tensor weight, float eps) -> (Tensor, Tensor)"


@torch.library.custom_op("autodeploy::fused_add_rms_norm", mutates_args=(), schema=SCHEMA)
def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: (rms_norm(x + residual), x + residual), the sum rounded to x's dtype as the model does."""
    added = x + residual
    return rms_norm(added, weight, eps), added


@fused_add_rms_norm.register_fake
def _(x, residual, weight, eps):
    torch._check(x.shape == residual.shape, lambda: "x and residual must have the same shape")
    return torch.empty_like(x), torch.empty_like(x)
