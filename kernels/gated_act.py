"""`autodeploy::gated_act`: act(gate) * up, the core of SwiGLU / GeGLU MLPs.

The projections stay separate linears (so sharding and quantization see ordinary linears); this op
is the elementwise part that a backend fuses with them or with itself. GPT-OSS's experts gate with a clamped
SwiGLU, `swigluoai` (vLLM's name): (clamp(up, -7, 7) + 1) * g * sigmoid(1.702 g), g = min(gate, 7), on a fused
projection whose gate and up columns alternate (INTERLEAVED: `split_gate_up` knows each activation's layout).
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


SWIGLUOAI_ALPHA, SWIGLUOAI_LIMIT = 1.702, 7.0


def swigluoai(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """GPT-OSS's clamped SwiGLU (module doc), in gate/up's dtype as its experts compute it."""
    gate = gate.clamp(max=SWIGLUOAI_LIMIT)
    up = up.clamp(-SWIGLUOAI_LIMIT, SWIGLUOAI_LIMIT)
    return (up + 1) * (gate * torch.sigmoid(gate * SWIGLUOAI_ALPHA))


# Gated activations of both gate and up whose fused projection alternates gate and up columns.
INTERLEAVED: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {"swigluoai": swigluoai}
GATED_ACTIVATIONS = (*ACTIVATIONS, *INTERLEAVED)


def gated(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    """act(gate) * up for an ACTIVATIONS name, or the INTERLEAVED activation's own function of both."""
    if activation in INTERLEAVED:
        return INTERLEAVED[activation](gate, up)
    return ACTIVATIONS[activation](gate) * up


def split_gate_up(gate_up: torch.Tensor, activation: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(gate, up) of a fused gate/up projection's output: alternate columns for an INTERLEAVED activation, else
    the two halves."""
    if activation in INTERLEAVED:
        return gate_up[..., 0::2], gate_up[..., 1::2]
    gate, up = gate_up.chunk(2, dim=-1)
    return gate, up


@torch.library.custom_op("autodeploy::gated_act", mutates_args=(), schema=SCHEMA)
def gated_act(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    """Reference: `gated(gate, up, activation)`, in gate/up's common dtype."""
    return gated(gate, up, activation)


@gated_act.register_fake
def _(gate, up, activation):
    torch._check(activation in GATED_ACTIVATIONS, lambda: f"unknown activation {activation!r}")
    shape = torch.broadcast_shapes(gate.shape, up.shape)
    return gate.new_empty(shape, dtype=torch.result_type(gate, up))
