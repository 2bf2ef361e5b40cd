"""`autodeploy::gated_linear`: linear(gated_act(gate, up, activation), weight, bias), a gated MLP's down
projection with its activation.

At batch-1 decode every kernel launch costs ~1.5-2 us and the gated activation's kernel moves only a few KB,
so `fuse_gated_linear` gives the pair one op, whose Triton backend forms act(gate) * up in the skinny GEMM as
it loads the input tiles: one launch instead of two. The reference composes the two canonical ops, so the
numbers are theirs by definition.
"""

from __future__ import annotations

import torch

from .gated_act import gated_act
from .linear import linear

SCHEMA = "(Tensor gate, Tensor up, Tensor weight, Tensor? bias, str activation) -> Tensor"


@torch.library.custom_op("autodeploy::gated_linear", mutates_args=(), schema=SCHEMA)
def gated_linear(gate: torch.Tensor, up: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 activation: str) -> torch.Tensor:
    """Reference: the canonical linear of the canonical gated_act."""
    return linear(gated_act(gate, up, activation), weight, bias)


@gated_linear.register_fake
def _(gate, up, weight, bias, activation):
    # The same composition on fake tensors: the two ops' fake impls give the shape, dtype and checks.
    return linear(gated_act(gate, up, activation), weight, bias)
