"""`autodeploy::rms_norm`: RMSNorm with Llama's numerics."""

from __future__ import annotations

import torch

SCHEMA = "(Tensor x, Tensor weight, float eps) -> Tensor"


@torch.library.custom_op("autodeploy::rms_norm", mutates_args=(), schema=SCHEMA)
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Reference: normalize x in float32, scale by weight, return x's dtype.

    The product is taken in the promoted dtype of (x, weight): for a weight in x's dtype that is
    exactly Llama (`weight * normed.to(x.dtype)`); for a float32 weight expression such as Gemma's
    `1 + weight.float()` it is exactly Gemma (`(normed * (1 + w)).type_as(x)`). The pattern matcher
    only emits this op where the original subgraph's result has x's dtype.
    """
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    compute_dtype = torch.promote_types(x.dtype, weight.dtype)
    return (weight * normed.to(compute_dtype)).to(x.dtype)


@rms_norm.register_fake
def _(x, weight, eps):
    return torch.empty_like(x)
