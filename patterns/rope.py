"""Recognise rotary position embedding applied to one tensor: x * cos + rotate(x) * sin.

Anchored on the rotation, which no other common subgraph produces:
  rotate_half      (Llama, NeoX):     cat([-x[..., d/2:], x[..., :d/2]], -1)
  rotate_every_two (GPT-J, Cohere):   stack([-x[..., 1::2], x[..., ::2]], -1).flatten(-2)
then forward to mul(rotated, sin) and add(mul(x, cos), .). cos/sin are whatever graph tensors are
multiplied in (RoPE scaling variants only change how those are computed). Partial rotary works
because x is then the rotary slice of the head.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx import Node

from autodeploy.graph_utils import is_op

from .helpers import bind_args, binary_operands, is_last_dim, same_tensor, val

aten = torch.ops.aten
_TO_END = 2**62  # slice ends at or past this (HF writes `x[..., h:]`, export stores INT64_MAX)


@dataclass
class RopeMatch:
    output: Node
    x: Node  # the tensor as multiplied by cos (q or k, or their rotary slice)
    cos: Node
    sin: Node
    interleaved: bool


def _slice(node: Node, source: Node | None = None) -> tuple[Node, int, int, int] | None:
    """A last-dim slice -> (sliced tensor, start, end, step); end is clamped to the dim size."""
    if not is_op(node, aten.slice) or (source is not None and not same_tensor(node.args[0], source)):
        return None
    args = bind_args(node)
    if not is_last_dim(args["dim"], node):
        return None
    size = val(args["self"]).shape[-1]
    start = args["start"] or 0
    end = size if args["end"] is None or args["end"] >= _TO_END else args["end"]
    return args["self"], start, min(end, size), args["step"]


def _halves_source(cat: Node) -> Node | None:
    """cat([-x[..., h:], x[..., :h]], -1) with h = d / 2 -> x."""
    if not is_op(cat, aten.cat) or len(cat.args[0]) != 2 or not is_last_dim(bind_args(cat)["dim"], cat):
        return None
    neg, low = cat.args[0]
    if not is_op(neg, aten.neg):
        return None
    high = _slice(neg.args[0])
    if high is None:
        return None
    x, h_start, h_end, h_step = high
    low = _slice(low, x)
    half = val(x).shape[-1] // 2
    if low is None or (low[1:], (h_start, h_end), h_step) != ((0, half, 1), (half, 2 * half), 1):
        return None
    return x


def _pairs_source(flat: Node) -> Node | None:
    """stack([-x[..., 1::2], x[..., ::2]], -1).flatten(-2) -> x."""
    if not is_op(flat, (aten.flatten, aten.view, aten.reshape, aten._unsafe_view)):
        return None
    stack = flat.args[0]
    if not is_op(stack, aten.stack) or len(stack.args[0]) != 2 or not is_last_dim(bind_args(stack)["dim"], stack):
        return None
    neg, even = stack.args[0]
    if not is_op(neg, aten.neg):
        return None
    odd = _slice(neg.args[0])
    if odd is None:
        return None
    x = odd[0]
    even = _slice(even, x)
    size = val(x).shape[-1]
    if even is None or odd[1:] != (1, size, 2) or even[1:] != (0, size, 2):
        return None
    return x if val(flat).shape == val(x).shape else None


def _product_with(x_like: Node, mul: Node) -> Node | None:
    """mul(t, other) or mul(other, t) where t is `x_like` -> other."""
    operands = binary_operands(mul, aten.mul)
    if operands is None:
        return None
    for t, other in (operands, operands[::-1]):
        if t is x_like and isinstance(other, Node):
            return other
    return None


def match_rope(node: Node) -> RopeMatch | None:
    """Anchor: a rotation node (see module doc); returns the whole x * cos + rotate(x) * sin."""
    interleaved = False
    source = _halves_source(node)
    if source is None:
        source, interleaved = _pairs_source(node), True
    if source is None:
        return None
    for sin_mul in node.users:
        sin = _product_with(node, sin_mul)
        if sin is None:
            continue
        for add in sin_mul.users:
            operands = binary_operands(add, aten.add)
            if operands is None or len(add.args) > 2 or add.kwargs.get("alpha", 1) != 1:
                continue
            cos_mul = operands[1] if operands[0] is sin_mul else operands[0]
            if not isinstance(cos_mul, Node) or not is_op(cos_mul, aten.mul):
                continue
            for x, cos in (cos_mul.args, cos_mul.args[::-1]):
                if same_tensor(x, source) and isinstance(cos, Node):
                    out = val(add)
                    if out.shape == val(x).shape and out.dtype == val(x).dtype:
                        return RopeMatch(add, x, cos, sin, interleaved)
    return None
