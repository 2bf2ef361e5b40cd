"""fuse_add_rms_norm: rms_norm(a + b) -> autodeploy::fused_add_rms_norm(a, b) -> (normed, a + b).

In a pre-norm decoder the sum is the next residual, so the unfused graph writes it, reads it back
for the norm and reads it again for the next add; the fused op reads a and b once and writes both
results (a sum with no other reader is fused too: the norm still reads one tensor less). Only adds of
two tensors of one shape and dtype are fused (no broadcasting, no alpha), so the op stays elementwise.
"""

from __future__ import annotations

import operator

import torch
from torch.fx import GraphModule, Node

from autodeploy.graph_utils import graph_modules, inherit_meta, is_op
from autodeploy.patterns.helpers import val

from .registry import Stage, Transform, TransformContext, register

aten = torch.ops.aten
FUSED = torch.ops.autodeploy.fused_add_rms_norm.default


def _same_shaped_add(node: Node) -> tuple[Node, Node] | None:
    """(a, b) when node is a + b of two tensors of one shape and dtype."""
    if not is_op(node, aten.add.Tensor) or len(node.args) != 2 or node.kwargs:
        return None
    a, b = node.args
    va, vb = val(a), val(b)
    if va is None or vb is None or va.dtype != vb.dtype or va.shape != vb.shape:
        return None
    return a, b


def _fuse(gm: GraphModule, norm: Node, add: Node, a: Node, b: Node) -> None:
    """Put the fused op right after the later of the add and the norm weight (Gemma computes its
    weight, 1 + w, in the graph) and hand it the norm's readers and every reader of the sum that
    comes after it. Readers in between (rare: a cast before the norm) keep the add alive."""
    graph = gm.graph
    _, weight, eps = norm.args
    order = {n: i for i, n in enumerate(graph.nodes)}
    anchor = max([add] + ([weight] if isinstance(weight, Node) else []), key=order.__getitem__)
    with graph.inserting_after(anchor):
        fused = graph.call_function(FUSED, (a, b, weight, eps))
    with graph.inserting_after(fused):
        total = graph.call_function(operator.getitem, (fused, 1))
        normed = graph.call_function(operator.getitem, (fused, 0))
    inherit_meta(fused, norm)
    fused.meta["val"] = (val(norm), val(add))
    normed.meta["val"], total.meta["val"] = val(norm), val(add)
    norm.replace_all_uses_with(normed)
    graph.erase_node(norm)
    for user in list(add.users):
        if order[user] > order[anchor]:
            user.replace_input_with(add, total)
    if not add.users:
        graph.erase_node(add)


@register
class FuseAddRMSNorm(Transform):
    name = "fuse_add_rms_norm"
    stage = Stage.FUSION

    def apply(self, gm: GraphModule, ctx: TransformContext) -> dict[str, int]:
        fused = 0
        for module in graph_modules(gm):
            for norm in list(module.graph.nodes):
                if not is_op(norm, torch.ops.autodeploy.rms_norm.default) or len(norm.args) != 3:
                    continue
                add = norm.args[0]
                operands = _same_shaped_add(add) if isinstance(add, Node) else None
                if operands is not None:
                    _fuse(module, norm, add, *operands)
                    fused += 1
        return {"fused_add_rms_norm": fused}
