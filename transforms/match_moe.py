"""match_moe: every routed-experts module of the model becomes one `autodeploy::moe` call.

The export patch `moe_experts_as_canonical_op` already emits the op for the layouts it supports;
this transform counts those, and replaces what remains (an experts region exported through one of
HF's own implementations, e.g. where the patch did not apply) by module boundary. Routers and shared
experts are left alone: they are ordinary graph ops and MLPs.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule

from autodeploy.export import WRAPPER_PREFIX
from autodeploy.graph_utils import inherit_meta
from autodeploy.patterns.moe import (
    ExpertsLayout,
    ExpertsRegion,
    experts_layout,
    experts_modules,
    find_experts_region,
    has_moe_op,
    module_nodes,
)

from .registry import Stage, Transform, TransformContext, register


def _weight_node(gm: GraphModule, anchor, target: str, transposed: bool):
    with gm.graph.inserting_before(anchor):
        node = gm.graph.get_attr(target)
        return gm.graph.call_function(torch.ops.aten.transpose.int, (node, 1, 2)) if transposed else node


def replace_experts_region(gm: GraphModule, region: ExpertsRegion, path: str, layout: ExpertsLayout) -> None:
    """Swap the region for one moe call on the module's parameters (`path` as in the graph)."""
    anchor = region.output
    w_gate_up = _weight_node(gm, anchor, f"{path}.gate_up_proj", layout.transposed)
    w_down = _weight_node(gm, anchor, f"{path}.down_proj", layout.transposed)
    biases = (
        (_weight_node(gm, anchor, f"{path}.gate_up_proj_bias", False), _weight_node(gm, anchor, f"{path}.down_proj_bias", False))
        if layout.has_bias else (None, None)
    )
    with gm.graph.inserting_before(anchor):
        weights = gm.graph.call_function(torch.ops.aten.to.dtype, (region.topk_weights, region.hidden.meta["val"].dtype))
        moe = gm.graph.call_function(
            torch.ops.autodeploy.moe.default,
            (region.hidden, region.topk_ids, weights, w_gate_up, w_down, layout.activation, *biases),
        )
    inherit_meta(moe, anchor, with_val=True)
    anchor.replace_all_uses_with(moe)
    # In-place ops (index_add_, ...) are not dead code to FX, so the region is erased explicitly;
    # symbolic sizes still used elsewhere stay.
    for node in reversed(region.nodes):
        if not node.users:
            gm.graph.erase_node(node)


@register
class MatchMoE(Transform):
    name = "match_moe"
    stage = Stage.PATTERN

    def apply(self, gm: GraphModule, ctx: TransformContext) -> dict[str, int]:
        exported = replaced = unsupported = 0
        for name, module in experts_modules(ctx.meta_model).items():
            path = WRAPPER_PREFIX + name  # experts traced inside a nested GraphModule are not looked for
            if has_moe_op(module_nodes(gm, path)):
                exported += 1
                continue
            region = find_experts_region(gm, path)
            layout = experts_layout(module)
            if region is None or not isinstance(layout, ExpertsLayout):
                unsupported += 1
                continue
            replace_experts_region(gm, region, path, layout)
            replaced += 1
        return {"moe": exported + replaced, "moe_from_export": exported, "moe_replaced": replaced,
                "moe_unsupported": unsupported}

    def expected(self, gm: GraphModule, ctx: TransformContext) -> dict[str, int]:
        return {"moe": len(experts_modules(ctx.meta_model))}
