"""fuse_norm_linear: linear(fused_add_rms_norm(x, r, w, eps)[0], W, b) -> autodeploy::add_rms_norm_linear(x, r, w,
eps, W, b) -> (y, x + r).

At batch-1 decode each kernel launch costs ~1.5-2 us and a layer's two residual add + RMSNorm kernels move only
a few KB each; add_rms_norm_linear's Triton backend normalizes the rows inside the next projection's skinny GEMM
(fused q/k/v, gate/up) as it loads them, rounded as fused_add_rms_norm rounds them, one launch instead of two,
and runs both kernels as before above one row (off in the default recipe: on an H200 it still lost at batch 1,
BENCHMARKS.md session 10). The sum's output keeps its readers (the next residual add).
Only a plain `autodeploy::linear` that is the normalized row's one reader, and not the LM head, is fused:
quantized linears keep their input (FP8's fuse_fp8_act_quant already quantizes it inside the norm), so
quantized models are unchanged.
A tensor-parallel graph's column-parallel linears are still plain linears of the replicated normalized row, so
they fuse the same way (each rank normalizes the whole row and keeps the whole residual).
"""

from __future__ import annotations

import operator

import torch
from torch.fx import GraphModule, Node

from autodeploy.graph_utils import graph_modules, inherit_meta, is_op
from autodeploy.patterns.helpers import bind_args, insert_call

from .registry import Stage, Transform, TransformContext, register

ADD_NORM = torch.ops.autodeploy.fused_add_rms_norm.default
LINEAR = torch.ops.autodeploy.linear.default
ADD_NORM_LINEAR = torch.ops.autodeploy.add_rms_norm_linear.default


def _outputs(norm: Node, index: int) -> list[Node]:
    """The getitem nodes reading output `index` of `norm`."""
    return [u for u in norm.users if u.target is operator.getitem and u.args[1] == index]


def _sole_linear_reader(norm: Node) -> Node | None:
    """The plain linear that is the only reader of `norm`'s normalized row, with that row as its input, or None."""
    normed = _outputs(norm, 0)
    if len(normed) != 1 or len(normed[0].users) != 1:
        return None
    linear = next(iter(normed[0].users))
    return linear if is_op(linear, LINEAR) and bind_args(linear)["x"] is normed[0] else None


def _is_head(linear: Node) -> bool:
    """Whether no canonical op reads `linear`'s result, directly or through views: the LM head, the widest GEMM of
    the graph (the vocabulary), where every one of its ~2,000 programs at 8B would wait for the whole row's norm
    before streaming (the final norm stays a kernel of its own)."""
    seen, todo = set(), [linear]
    while todo:
        node = todo.pop()
        for user in node.users:
            if user.op == "call_function" and str(user.target).startswith("autodeploy."):
                return False
            if user not in seen:
                seen.add(user)
                todo.append(user)
    return True


def _fuse(module: GraphModule, norm: Node, linear: Node) -> bool:
    """One add_rms_norm_linear after the later of the norm and the linear's parameters; False (nothing changed)
    where a reader of the sum would then come before it."""
    graph = module.graph
    args = bind_args(linear)
    order = {n: i for i, n in enumerate(graph.nodes)}
    anchor = max([norm] + [a for a in (args["weight"], args["bias"]) if isinstance(a, Node)], key=order.__getitem__)
    sums = _outputs(norm, 1)
    if any(order[user] <= order[anchor] for total in sums for user in total.users):
        return False
    with graph.inserting_after(anchor):
        fused = insert_call(graph, ADD_NORM_LINEAR, (*norm.args, args["weight"], args["bias"]))
    inherit_meta(fused, norm)
    with graph.inserting_after(fused):
        added = insert_call(graph, operator.getitem, (fused, 1))
        y = insert_call(graph, operator.getitem, (fused, 0))
    inherit_meta(y, linear)
    linear.replace_all_uses_with(y)
    graph.erase_node(linear)
    for total in sums:
        total.replace_all_uses_with(added)
        graph.erase_node(total)
    graph.erase_node(_outputs(norm, 0)[0])
    graph.erase_node(norm)
    return True


@register
class FuseNormLinear(Transform):
    name = "fuse_norm_linear"
    stage = Stage.FUSION

    def apply(self, gm: GraphModule, ctx: TransformContext) -> dict[str, int]:
        fused = 0
        for module in graph_modules(gm):
            for norm in list(module.graph.nodes):
                linear = _sole_linear_reader(norm) if is_op(norm, ADD_NORM) else None
                if linear is not None and not _is_head(linear) and _fuse(module, norm, linear):
                    fused += 1
        return {"add_rms_norm_linear": fused}
