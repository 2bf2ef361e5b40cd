"""match_linear: aten.linear -> autodeploy::linear, the op later quantization/sharding swap.

Runs after the other pattern transforms in a recipe (they also accept autodeploy::linear, so the
order is a convention, not a requirement).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.fx import GraphModule

from autodeploy.patterns.linear import match_linear

from ._rewrite import replace_matches
from .registry import Stage, Transform, TransformContext, register


@register
class MatchLinear(Transform):
    name = "match_linear"
    stage = Stage.PATTERN

    def apply(self, gm: GraphModule, ctx: TransformContext) -> dict[str, int]:
        count = replace_matches(
            gm, match_linear, torch.ops.autodeploy.linear.default, lambda m: (m.x, m.weight, m.bias)
        )
        return {"linear": count}

    def expected(self, gm: GraphModule, ctx: TransformContext) -> dict[str, int]:
        return {"linear": sum(isinstance(m, nn.Linear) for m in ctx.meta_model.modules())}
