"""Recognise rotary position embedding applied to one tensor: x * cos + rotate(x) * sin.

Anchored on the rotation, which no other common subgraph produces:
  rotate_half      (Llama, NeoX):     cat([-x[..., d/2:], x[..., :d/2]], -1)
  rotate_every_two (GPT-J, Cohere):   stack([-x[..., 1::2], x[..., ::2]], -1).flatten(-2)
then forward to mul(rotated, sin) and add(mul(x, cos), .). cos/sin are whatever graph tensors are
multiplied in (RoPE scaling variants only change how those are computed). Partial rotary works
because x is then the rotary slice of the head. Where cos is wider than x (OLMo 2 keeps float32 cos / sin
for bf16 q / k) the sum comes out in cos's dtype and one cast takes it back to x's: the match ends at that
cast, as the canonical op computes in the promoted dtype and casts.

Two forms compute the pairwise rotation without a rotation node; they have no x/cos/sin tensors of
the canonical op's layout in the graph, so their matches say what to build them from:
  complex      (DeepSeek-V2, Meta's Llama):
      view_as_real(view_as_complex(x.reshape(..., d/2, 2)) * freqs_cis).flatten(-2)    -> ComplexRopeMatch
  split pairs  (DeepSeek-V3, rope_interleave):  with x1, x2 = x[..., 0::2], x[..., 1::2]
      cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)                               -> SplitPairsRopeMatch
The same sum on x's halves (GPT-OSS: x1, x2 = chunk(x, 2, -1), cos / sin [..., d/2]) is rotate-half RoPE of x
with cos / sin repeated: SplitHalvesRopeMatch.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
from torch.fx import Node

from autodeploy.graph_utils import is_op

from .helpers import bind_args, binary_operands, is_last_dim, same_tensor, val

aten = torch.ops.aten
_TO_END = 2**62  # slice ends at or past this (HF writes `x[..., h:]`, export stores INT64_MAX)
_RESHAPES = (aten.flatten, aten.view, aten.reshape, aten._unsafe_view)
_CASTS = (aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default)


@dataclass
class RopeMatch:
    output: Node
    x: Node  # the tensor as multiplied by cos (q or k, or their rotary slice)
    cos: Node
    sin: Node
    interleaved: bool


@dataclass
class ComplexRopeMatch:
    """x's adjacent pairs as complex numbers times freqs_cis = e^{i theta} (times a scale, e.g. yarn's).

    That is the interleaved rotation with cos/sin = real/imaginary part of freqs_cis, each repeated
    twice along the last dim.
    """

    output: Node
    x: Node  # real, [..., d]
    freqs_cis: Node  # complex, [..., d/2] broadcastable against x's pairs


@dataclass
class SplitPairsRopeMatch:
    """The interleaved rotation written on x's even/odd slices, output in rotate-half layout.

    Equals rotate-half RoPE applied to cat([even, odd], -1) with cos/sin = cat([cos, cos], -1),
    which is how DeepSeek-V3's original code computed it (de-interleave, then rotate_half).
    """

    output: Node
    even: Node  # x[..., 0::2]
    odd: Node  # x[..., 1::2]
    cos: Node  # [..., d/2]
    sin: Node


@dataclass
class SplitHalvesRopeMatch:
    """Rotate-half RoPE written on x's halves with half-size cos / sin: the canonical op on x with
    cos / sin = cat([cos, cos], -1)."""

    output: Node
    x: Node
    cos: Node  # [..., d/2]
    sin: Node


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
    if not is_op(cat, aten.cat) or not _is_last_dim_cat(cat):
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


def _strided_pairs_source(even: Any, odd: Any) -> Node | None:
    """x[..., 0::2] and x[..., 1::2] of one x -> x."""
    if not isinstance(even, Node) or not isinstance(odd, Node):
        return None
    even_slice = _slice(even)
    if even_slice is None:
        return None
    x = even_slice[0]
    odd_slice = _slice(odd, x)
    size = val(x).shape[-1]
    if odd_slice is None or even_slice[1:] != (0, size, 2) or odd_slice[1:] != (1, size, 2):
        return None
    return x


def _chunked_halves_source(first: Any, second: Any) -> Node | None:
    """x[..., :d/2] and x[..., d/2:] of one x, as chunk(x, 2, -1)'s two parts or as slices -> x."""
    if not isinstance(first, Node) or not isinstance(second, Node):
        return None
    if first.target is operator.getitem and second.target is operator.getitem:
        parts = first.args[0]
        if (second.args[0] is not parts or (first.args[1], second.args[1]) != (0, 1)
                or not is_op(parts, (aten.chunk, aten.split)) or len(parts.users) != 2):
            return None
        x = parts.args[0]
        dim = bind_args(parts)["dim"]
        half = val(x).shape[-1] // 2
        same_halves = all(val(t).shape[-1] == half for t in (first, second)) and 2 * half == val(x).shape[-1]
        return x if is_last_dim(dim, x) and same_halves else None
    low = _slice(first)
    if low is None:
        return None
    x = low[0]
    high = _slice(second, x)
    half = val(x).shape[-1] // 2
    if high is None or 2 * half != val(x).shape[-1] or (low[1:], high[1:]) != ((0, half, 1), (half, 2 * half, 1)):
        return None
    return x


def _is_last_dim_cat(node: Node) -> bool:
    """cat or stack of two tensors along the last dim."""
    return len(node.args[0]) == 2 and is_last_dim(bind_args(node)["dim"], node)


def _pairs_source(flat: Node) -> Node | None:
    """stack([-x[..., 1::2], x[..., ::2]], -1).flatten(-2) -> x."""
    if not is_op(flat, _RESHAPES):
        return None
    stack = flat.args[0]
    if not is_op(stack, aten.stack) or not _is_last_dim_cat(stack):
        return None
    neg, even = stack.args[0]
    if not is_op(neg, aten.neg):
        return None
    x = _strided_pairs_source(even, neg.args[0])
    return x if x is not None and val(flat).shape == val(x).shape else None


def _product_with(x_like: Node, mul: Node) -> Node | None:
    """mul(t, other) or mul(other, t) where t is `x_like` -> other."""
    operands = binary_operands(mul, aten.mul)
    if operands is None:
        return None
    for t, other in (operands, operands[::-1]):
        if t is x_like and isinstance(other, Node):
            return other
    return None


def _unscaled_operands(node: Any, op) -> tuple[Any, Any] | None:
    """(a, b) of add(a, b) / sub(a, b) with alpha 1 (op picks which), else None."""
    operands = binary_operands(node, op) if isinstance(node, Node) else None
    if operands is None or len(node.args) > 2 or node.kwargs.get("alpha", 1) != 1:
        return None
    return operands


def _factor_orders(mul: Any) -> list[tuple[Any, Any]]:
    """Both orders of mul's operands ([] when `mul` is no mul), for matching commutative products."""
    operands = binary_operands(mul, aten.mul) if isinstance(mul, Node) else None
    return [operands, operands[::-1]] if operands is not None else []


def _rotation_rope(node: Node) -> RopeMatch | None:
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
            operands = _unscaled_operands(add, aten.add)
            if operands is None:
                continue
            cos_mul = operands[1] if operands[0] is sin_mul else operands[0]
            for x, cos in _factor_orders(cos_mul):
                if same_tensor(x, source) and isinstance(cos, Node):
                    output = _rotation_output(add, x, cos)
                    if output is not None:
                        return RopeMatch(output, x, cos, sin, interleaved)
    return None


def _rotation_output(add: Node, x: Node, cos: Node) -> Node | None:
    """The node holding rope(x, cos, sin): the sum itself when it is in x's dtype, else its only user when that
    casts the sum from the promoted dtype of x and cos back to x's (what the canonical op computes), else None."""
    out, x_val = val(add), val(x)
    if out is None or out.shape != x_val.shape:
        return None
    if out.dtype == x_val.dtype:
        return add
    cast = next(iter(add.users)) if len(add.users) == 1 else None
    if (cast is None or not is_op(cast, _CASTS) or val(cast) is None or val(cast).dtype != x_val.dtype
            or out.dtype != torch.promote_types(x_val.dtype, val(cos).dtype)):
        return None
    return cast


def _complex_pairs_source(pairs: Any) -> Node | None:
    """view_as_complex(x.reshape(..., d/2, 2)) -> x."""
    if not isinstance(pairs, Node) or not is_op(pairs, aten.view_as_complex) or not is_op(pairs.args[0], _RESHAPES):
        return None
    x = pairs.args[0].args[0]
    shape = val(x).shape
    return x if tuple(val(pairs.args[0]).shape) == (*shape[:-1], shape[-1] // 2, 2) else None


def _is_complex(node: Any) -> bool:
    return val(node) is not None and val(node).is_complex()


def _complex_rope(flat: Node) -> ComplexRopeMatch | None:
    """Anchor: view_as_real(view_as_complex(x.reshape(..., d/2, 2)) * freqs_cis).flatten(-2).

    Anchored on the last node: the matched subgraph is erased on replacement, and nodes after the
    anchor are still to be visited.
    """
    if not is_op(flat, _RESHAPES) or not is_op(flat.args[0], aten.view_as_real):
        return None
    product = flat.args[0].args[0]
    for pairs, freqs in _factor_orders(product):
        x = _complex_pairs_source(pairs)
        if x is None or not _is_complex(freqs):
            continue
        pairs_shape = val(pairs).shape
        if val(product).shape == pairs_shape and val(freqs).shape[-1] == pairs_shape[-1]:
            out = val(flat)
            if out.shape == val(x).shape and out.dtype == val(x).dtype:
                return ComplexRopeMatch(flat, x, freqs)
    return None


def _products(node: Any, op) -> set[frozenset] | None:
    """op(a * b, c * d) with alpha 1 -> {{a, b}, {c, d}}: the factors, order-free."""
    operands = _unscaled_operands(node, op)
    if operands is None or not all(_factor_orders(t) for t in operands):
        return None
    return {frozenset(t.args[:2]) for t in operands}


def _split_pairs_rope(cat: Node) -> SplitPairsRopeMatch | SplitHalvesRopeMatch | None:
    """Anchor: cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1) on x's strided pairs or halves (module doc)."""
    if not is_op(cat, aten.cat) or not _is_last_dim_cat(cat):
        return None
    difference, total = cat.args[0]
    operands = _unscaled_operands(difference, aten.sub)
    total = _products(total, aten.add)
    if operands is None or total is None:
        return None
    for first, cos in _factor_orders(operands[0]):
        for second, sin in _factor_orders(operands[1]):
            if total != {frozenset((second, cos)), frozenset((first, sin))}:
                continue
            pairs_of = _strided_pairs_source(first, second)
            x = pairs_of if pairs_of is not None else _chunked_halves_source(first, second)
            if x is None:
                continue
            half = val(x).shape[-1] // 2
            halves = all(isinstance(t, Node) and val(t).shape[-1] == half for t in (cos, sin))
            out = val(cat)
            if halves and out.shape == val(x).shape and out.dtype == val(x).dtype:
                if pairs_of is not None:
                    return SplitPairsRopeMatch(cat, first, second, cos, sin)
                return SplitHalvesRopeMatch(cat, x, cos, sin)
    return None


AnyRopeMatch = RopeMatch | ComplexRopeMatch | SplitPairsRopeMatch | SplitHalvesRopeMatch


def match_rope(node: Node) -> AnyRopeMatch | None:
    """Any form of the module doc, each anchored on the node that identifies it."""
    for form in (_rotation_rope, _complex_rope, _split_pairs_rope):
        match = form(node)
        if match is not None:
            return match
    return None
