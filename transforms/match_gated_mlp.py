"""match_gated_mlp: act(gate) * up of SwiGLU/GeGLU MLPs -> autodeploy::gated_act.

Only the elementwise part becomes a canonical op; the gate/up/down projections stay linears so
sharding and quantization treat them like any other linear.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.fx import GraphModule

from autodeploy.patterns.gated_mlp import match_gated_mlp

from ._rewrite import replace_matches
from .registry import Stage, Transform, TransformContext, register


@register
class MatchGatedMLP(Transform):
    name = "match_gated_mlp"
    stage = Stage.PATTERN

    def apply(self, gm: GraphModule, ctx: TransformContext) -> dict[str, int]:
        count = replace_matches(
            gm, match_gated_mlp, torch.ops.autodeploy.gated_act.default, lambda m: (m.gate, m.up, m.activation)
        )
        return {"gated_mlp": count}

    def expected(self, gm: GraphModule, ctx: TransformContext) -> dict[str, int]:
        """One per HF module with gate and up projection submodules (separate, or fused as
        gate_up_proj). MoE expert banks hold gate_up_proj as a parameter, not a module: not counted."""

        def projection(module: nn.Module, name: str) -> bool:
            return isinstance(getattr(module, name, None), nn.Module)

        gated = sum(
            (projection(m, "gate_proj") and projection(m, "up_proj")) or projection(m, "gate_up_proj")
            for m in ctx.meta_model.modules()
        )
        return {"gated_mlp": gated}
