"""`autodeploy::gated_act`: act(gate) * up, the core of SwiGLU / GeGLU MLPs.

The projections stay separate linears (so sharding and quantization see ordinary linears); this op
is the elementwise part that a backend fuses with them or with itself.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

SCHEMA = "(Tensor gate, Tensor up, str activation) -> Tensor"

# Names follow the activations the zoo models use (HF's hidden_act values map onto these).
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


@torch.library.custom_op("autodeploy::gated_act", mutates_args=(), schema=SCHEMA)
def gated_act(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    """Reference: ACTIVATIONS[activation](gate) * up, in gate/up's common dtype."""
    return ACTIVATIONS[activation](gate) * up


@gated_act.register_fake
def _(gate, up, activation):
    torch._check(activation in ACTIVATIONS, lambda: f"unknown activation {activation!r}")
    shape = torch.broadcast_shapes(gate.shape, up.shape)
    return gate.new_empty(shape, dtype=torch.result_type(gate, up))
