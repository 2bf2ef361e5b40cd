"""Recognise the gated part of SwiGLU / GeGLU MLPs: act(gate) * up.

Anchored on the activation op. To keep plain `act(x) * y` elsewhere from matching, gate and up must
be sibling projections: two linears of the same input (Llama's gate_proj / up_proj), or two pieces
of one split/chunked linear output (Phi-3's gate_up_proj). Activations are the aten ops silu, gelu
(exact or tanh) and relu; activations written out elementwise (e.g. HF's "gelu_new" formula) are
not recognised.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch.fx import Node

from autodeploy.graph_utils import is_op

from .helpers import LINEAR_OPS, binary_operands, bind_args, same_tensor, sole_user, strip

aten = torch.ops.aten


@dataclass
class GatedMLPMatch:
    output: Node  # the product act(gate) * up
    gate: Node
    up: Node
    activation: str  # a key of autodeploy.kernels.gated_act.ACTIVATIONS


def activation_name(node: Node) -> str | None:
    """The canonical activation name of an activation node, None if it is not one."""
    if is_op(node, aten.silu):
        return "silu"
    if is_op(node, aten.relu):
        return "relu"
    if is_op(node, aten.gelu):
        return "gelu_tanh" if bind_args(node)["approximate"] == "tanh" else "gelu"
    return None


def _are_sibling_projections(a: Node, b: Node) -> bool:
    a, b = strip(a), strip(b)
    if is_op(a, LINEAR_OPS) and is_op(b, LINEAR_OPS):
        return a is not b and same_tensor(a.args[0], b.args[0])
    return (
        a.op == b.op == "call_function"
        and a.target is b.target is operator.getitem
        and a.args[0] is b.args[0]
        and a.args[1] != b.args[1]
    )


def match_gated_mlp(node: Node) -> GatedMLPMatch | None:
    """Anchor: an activation whose only user multiplies it with a sibling projection."""
    activation = activation_name(node)
    product = sole_user(node) if activation is not None else None
    operands = binary_operands(product, aten.mul) if product is not None else None
    if operands is None:
        return None
    up = operands[1] if operands[0] is node else operands[0]
    gate = node.args[0]
    if not isinstance(up, Node) or not _are_sibling_projections(gate, up):
        return None
    return GatedMLPMatch(product, gate, up, activation)
