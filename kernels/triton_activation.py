"""act(gate) * up in Triton, written once for every kernel that applies a gated activation.

The `gated_act` kernel stores it; the skinny GEMM's GATED prologue (the `gated_linear` backend) forms it
from the gate and up tiles it loads. Both must give `gated_act`'s numbers, so both take them from here.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .gated_act import GATED_ACTIVATIONS, SWIGLUOAI_ALPHA, SWIGLUOAI_LIMIT

# The `ACTIVATION` constexpr of the kernels, per canonical activation name.
ACTIVATION_IDS = {"silu": 0, "gelu": 1, "gelu_tanh": 2, "relu": 3, "swigluoai": 4}
assert set(ACTIVATION_IDS) == set(GATED_ACTIVATIONS), "every canonical activation needs a Triton branch"
_ALPHA, _LIMIT = tl.constexpr(SWIGLUOAI_ALPHA), tl.constexpr(SWIGLUOAI_LIMIT)


@triton.jit
def gated_product(gate, up, ACTIVATION: tl.constexpr):
    """act(gate) * up in float32, the activation rounded to gate's dtype first as the eager `act(gate) * up`
    rounds it (swigluoai: its glu, times clamp(up) + 1); the caller rounds the product to its output dtype."""
    g = gate.to(tl.float32)
    u = up.to(tl.float32)
    if ACTIVATION == 4:
        g = tl.minimum(g, _LIMIT)
        u = tl.minimum(tl.maximum(u, -_LIMIT), _LIMIT) + 1.0
        act = g * tl.sigmoid(g * _ALPHA)
    elif ACTIVATION == 0:
        act = g * tl.sigmoid(g)
    elif ACTIVATION == 1:
        act = 0.5 * g * (1.0 + tl.math.erf(g * 0.7071067811865476))
    elif ACTIVATION == 2:  # tanh(z) = 2 * sigmoid(2z) - 1
        z = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        act = g * tl.sigmoid(2.0 * z)  # 0.5 * g * (1 + tanh(z))
    else:
        act = tl.maximum(g, 0.0)
    return act.to(gate.dtype).to(tl.float32) * u
