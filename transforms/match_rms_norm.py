"""match_rms_norm: RMSNorm subgraphs (Llama and Gemma forms) -> autodeploy::rms_norm."""

from __future__ import annotations

import torch
from torch.fx import GraphModule

from autodeploy.patterns.rms_norm import match_rms_norm

from ._rewrite import replace_matches
from .registry import Stage, Transform, TransformContext, register


@register
class MatchRMSNorm(Transform):
    name = "match_rms_norm"
    stage = Stage.PATTERN

    def apply(self, gm: GraphModule, ctx: TransformContext) -> dict[str, int]:
        count = replace_matches(
            gm, match_rms_norm, torch.ops.autodeploy.rms_norm.default, lambda m: (m.x, m.weight, m.eps)
        )
        return {"rms_norm": count}

    def expected(self, gm: GraphModule, ctx: TransformContext) -> dict[str, int]:
        """One per HF *RMSNorm module (layer norms, final norm, q/k norms)."""
        return {"rms_norm": sum(type(m).__name__.endswith("RMSNorm") for m in ctx.meta_model.modules())}
