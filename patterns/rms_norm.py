"""Recognise RMSNorm: x * rsqrt(mean(x^2, -1, keepdim) + eps) * weight, around HF's casts.

Anchored on rsqrt. Covers Llama's form (`weight * normed.to(x.dtype)`) and Gemma's
(`(normed * (1 + weight.float())).type_as(x)`: the weight operand is then the graph's `1 + w`
expression). Does not cover norms written without rsqrt (x / sqrt(...)) or over other dims.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx import Node

from autodeploy.graph_utils import is_op

from .helpers import advance, bind_args, binary_operands, is_last_dim, same_tensor, scalar, sole_user, strip, val

aten = torch.ops.aten


@dataclass
class RMSNormMatch:
    output: Node  # first node after the weight product that has x's dtype
    x: Node  # the input before HF's upcast
    weight: Node  # a parameter, or a weight expression such as Gemma's 1 + w
    eps: float


def _squared(node: Node) -> Node | None:
    """pow(t, 2) or t * t -> t."""
    if is_op(node, aten.pow) and scalar(node.args[1]) == 2.0:
        return node.args[0]
    operands = binary_operands(node, aten.mul)
    if operands is not None and same_tensor(*operands):
        return operands[0]
    return None


def _variance_input(rsqrt: Node) -> tuple[Node, float] | None:
    """rsqrt(mean(t^2, -1, keepdim=True) + eps) -> (t, eps)."""
    operands = binary_operands(strip(rsqrt.args[0]), aten.add)
    if operands is None:
        return None
    mean, eps = operands if scalar(operands[1]) is not None else operands[::-1]
    mean = strip(mean)
    if scalar(eps) is None or not is_op(mean, aten.mean.dim):
        return None
    args = bind_args(mean)
    if not args["keepdim"] or len(args["dim"] or ()) != 1 or not is_last_dim(args["dim"][0], mean.args[0]):
        return None
    squared = _squared(strip(mean.args[0]))
    return (squared, scalar(eps)) if squared is not None else None


def _other_operand(mul: Node, known: Node) -> Node | None:
    operands = binary_operands(mul, aten.mul)
    if operands is None or known not in operands:
        return None
    other = operands[1] if operands[0] is known else operands[0]
    return other if isinstance(other, Node) else None


def match_rms_norm(node: Node) -> RMSNormMatch | None:
    """Anchor: rsqrt; walk back to x and eps, forward through mul(x, rsqrt) to the weight product."""
    if not is_op(node, aten.rsqrt):
        return None
    variance = _variance_input(node)
    if variance is None:
        return None
    source, eps = variance
    normed = sole_user(node)
    if normed is None or not same_tensor(_other_operand(normed, node), source):
        return None
    x = strip(source, exact=True)
    x_val = val(x)
    normed = advance(normed)
    weighted = sole_user(normed)
    weight = _other_operand(weighted, normed) if weighted is not None else None
    if weight is None or val(weight) is None:
        return None
    out = advance(weighted, stop=lambda n: val(n).dtype == x_val.dtype)
    if val(out).shape != x_val.shape or val(out).dtype != x_val.dtype:
        return None
    return RMSNormMatch(out, x, weight, eps)
