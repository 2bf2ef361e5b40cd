"""match_rope: x * cos + rotate(x) * sin -> autodeploy::rope (rotate-half or interleaved).

The complex and split-pairs forms (patterns/rope.py) have no cos/sin (or x) in the op's layout; the
few ops that derive them are inserted before the match, using only the values the model computed,
so the result equals the model's up to fp32 rounding.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from autodeploy.graph_utils import is_op
from autodeploy.patterns.helpers import insert_call
from autodeploy.patterns.rope import (AnyRopeMatch, ComplexRopeMatch, SplitHalvesRopeMatch, SplitPairsRopeMatch,
                                      match_rope)

from ._rewrite import replace_matches
from .registry import Stage, Transform, TransformContext, register

aten = torch.ops.aten


def _repeated_part(parts: Node, index: int) -> Node:
    """Real (0) or imaginary (1) part of view_as_real(freqs_cis), each element repeated twice."""
    part = insert_call(parts.graph, aten.select.int, (parts, -1, index))
    return insert_call(parts.graph, aten.repeat_interleave.self_int, (part, 2, -1))


def _complex_operands(match: ComplexRopeMatch) -> tuple[Node, Node, Node, bool]:
    """x * e^{i theta} on adjacent pairs is the interleaved rotation by (cos, sin) = (Re, Im) of e^{i theta}."""
    graph = match.output.graph
    with graph.inserting_before(match.output):
        parts = insert_call(graph, aten.view_as_real.default, (match.freqs_cis,))
        return match.x, _repeated_part(parts, 0), _repeated_part(parts, 1), True


def _split_operands(match: SplitPairsRopeMatch | SplitHalvesRopeMatch) -> tuple[Node, Node, Node, bool]:
    """Rotate-half RoPE of x (the de-interleaved x for strided pairs), with cos/sin in the rotate-half layout (see
    the matches)."""
    graph = match.output.graph

    def cat(a: Node, b: Node) -> Node:
        """cat([a, b], -1), the one the graph already has ahead of this match when there is one: q and k of a layer
        then share cos / sin, which fuse_rope_pairs needs."""
        for user in a.users:
            if is_op(user, aten.cat) and user.args == ([a, b], -1) and user < match.output:
                return user
        return insert_call(graph, aten.cat.default, ([a, b], -1))

    with graph.inserting_before(match.output):
        x = match.x if isinstance(match, SplitHalvesRopeMatch) else cat(match.even, match.odd)
        return x, cat(match.cos, match.cos), cat(match.sin, match.sin), False


def _operands(match: AnyRopeMatch) -> tuple[Node, Node, Node, bool]:
    """(x, cos, sin, interleaved) of the canonical op for any form of match."""
    if isinstance(match, ComplexRopeMatch):
        return _complex_operands(match)
    if isinstance(match, (SplitPairsRopeMatch, SplitHalvesRopeMatch)):
        return _split_operands(match)
    return match.x, match.cos, match.sin, match.interleaved


@register
class MatchRope(Transform):
    name = "match_rope"
    stage = Stage.PATTERN

    def apply(self, gm: GraphModule, ctx: TransformContext) -> dict[str, int]:
        return {"rope": replace_matches(gm, match_rope, torch.ops.autodeploy.rope.default, _operands)}

    def expected(self, gm: GraphModule, ctx: TransformContext) -> dict[str, int]:
        """q and k of every layer, when the model has a rotary embedding module."""
        has_rope = any(type(m).__name__.endswith("RotaryEmbedding") for m in ctx.meta_model.modules())
        return {"rope": 2 * ctx.source.config.get_text_config().num_hidden_layers} if has_rope else {}
