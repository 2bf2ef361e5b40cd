"""match_rope: x * cos + rotate(x) * sin -> autodeploy::rope (rotate-half or interleaved)."""

from __future__ import annotations

import torch
from torch.fx import GraphModule

from autodeploy.patterns.rope import match_rope

from ._rewrite import replace_matches
from .registry import Stage, Transform, TransformContext, register


@register
class MatchRope(Transform):
    name = "match_rope"
    stage = Stage.PATTERN

    def apply(self, gm: GraphModule, ctx: TransformContext) -> dict[str, int]:
        count = replace_matches(
            gm, match_rope, torch.ops.autodeploy.rope.default, lambda m: (m.x, m.cos, m.sin, m.interleaved)
        )
        return {"rope": count}

    def expected(self, gm: GraphModule, ctx: TransformContext) -> dict[str, int]:
        """q and k of every layer, when the model has a rotary embedding module."""
        has_rope = any(type(m).__name__.endswith("RotaryEmbedding") for m in ctx.meta_model.modules())
        return {"rope": 2 * ctx.source.config.get_text_config().num_hidden_layers} if has_rope else {}
