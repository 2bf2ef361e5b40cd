"""match_causal_conv: HF's short causal depthwise conv1d -> autodeploy::causal_conv1d.

The op is what `insert_state_cache` later gives a per-sequence conv state, so a decode step sees the
inputs of the previous steps (the exported conv only sees the tokens of its own forward).
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule

from autodeploy.patterns.causal_conv import CausalConvMatch, match_causal_conv

from ._rewrite import replace_matches
from .registry import Stage, Transform, TransformContext, register


@register
class MatchCausalConv(Transform):
    name = "match_causal_conv"
    stage = Stage.PATTERN

    def apply(self, gm: GraphModule, ctx: TransformContext) -> dict[str, int]:
        def operands(match: CausalConvMatch) -> tuple:
            graph = match.output.graph
            with graph.inserting_before(match.output):
                weight = graph.call_function(torch.ops.aten.squeeze.dim, (match.weight, 1))  # [c, k]
            weight.meta["val"] = match.weight.meta["val"].squeeze(1)
            return match.x, weight, match.bias, None

        return {"causal_conv": replace_matches(gm, match_causal_conv, torch.ops.autodeploy.causal_conv1d.default,
                                               operands)}
