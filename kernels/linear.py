"""`autodeploy::linear`: y = x @ weight.T + bias, the op quantization and sharding transforms swap."""

from __future__ import annotations

import torch
import torch.nn.functional as F

SCHEMA = "(Tensor x, Tensor weight, Tensor? bias=None) -> Tensor"


@torch.library.custom_op("autodeploy::linear", mutates_args=(), schema=SCHEMA)
def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Reference: torch's own linear."""
    return F.linear(x, weight, bias)


@linear.register_fake
def _(x, weight, bias=None):
    return x.new_empty(*x.shape[:-1], weight.shape[0])
