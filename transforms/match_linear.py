"""match_linear: linear layers (aten.linear, and the matmul forms of patterns/linear.py) ->
autodeploy::linear, the op later quantization/sharding swap.

Runs after the other pattern transforms in a recipe (they also accept autodeploy::linear, so the
order is a convention, not a requirement).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.fx import GraphModule, Node
from transformers.pytorch_utils import Conv1D

from autodeploy.patterns.helpers import insert_call
from autodeploy.patterns.linear import LinearMatch, match_linear

from ._rewrite import replace_matches
from .registry import Stage, Transform, TransformContext, register

# Modules that compute one linear layer each: nn.Linear (FalconLinear is one) and GPT-2's Conv1D.
LINEAR_MODULES = (nn.Linear, Conv1D)


def _operands(match: LinearMatch) -> tuple[Node, Node, Node | None]:
    """(x, weight [out, in], bias); a weight stored [in, out] gets a transpose in the graph.

    The parameter keeps its checkpoint layout, so weight loading stays a plain copy; a later stage
    may fold the transpose into the stored weight.
    """
    weight = match.weight
    if match.transposed:
        graph = match.output.graph
        with graph.inserting_before(match.output):
            weight = insert_call(graph, torch.ops.aten.t.default, (weight,))
    return match.x, weight, match.bias


@register
class MatchLinear(Transform):
    name = "match_linear"
    stage = Stage.PATTERN

    def apply(self, gm: GraphModule, ctx: TransformContext) -> dict[str, int]:
        return {"linear": replace_matches(gm, match_linear, torch.ops.autodeploy.linear.default, _operands)}

    def expected(self, gm: GraphModule, ctx: TransformContext) -> dict[str, int]:
        return {"linear": sum(isinstance(m, LINEAR_MODULES) for m in ctx.meta_model.modules())}
