"""fuse_gated_linear: linear(gated_act(gate, up, act), w, b) -> autodeploy::gated_linear(gate, up, w, b, act).

At batch-1 decode each kernel launch costs ~1.5-2 us and the gated activation's kernel moves only a few KB;
gated_linear's Triton backend forms act(gate) * up inside the down projection's skinny GEMM as it loads its
input (rounded as gated_act rounds it), one launch instead of two, and runs both kernels as before above one
row. Off in the default recipe: on an H200 it still lost at batch 1 (BENCHMARKS.md session 10). Only a plain
`autodeploy::linear` that is the activation's one reader is fused: quantized linears keep their input (FP8's
fuse_fp8_act_quant quantizes it in its own kernel), so quantized models are unchanged.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from autodeploy.graph_utils import graph_modules, is_op, replace_with_call
from autodeploy.patterns.helpers import bind_args

from .registry import Stage, Transform, TransformContext, register

GATED_ACT = torch.ops.autodeploy.gated_act.default
LINEAR = torch.ops.autodeploy.linear.default
GATED_LINEAR = torch.ops.autodeploy.gated_linear.default


def _sole_gated_input(linear: Node) -> Node | None:
    """The gated_act node `linear` reads when the linear is its only reader, else None."""
    x = bind_args(linear)["x"]
    return x if isinstance(x, Node) and is_op(x, GATED_ACT) and len(x.users) == 1 else None


def _fuse(module: GraphModule, linear: Node, act: Node) -> None:
    gated, args = bind_args(act), bind_args(linear)
    replace_with_call(module, linear, GATED_LINEAR,
                      (gated["gate"], gated["up"], args["weight"], args["bias"], gated["activation"]))
    module.graph.erase_node(linear)
    module.graph.erase_node(act)


@register
class FuseGatedLinear(Transform):
    name = "fuse_gated_linear"
    stage = Stage.FUSION

    def apply(self, gm: GraphModule, ctx: TransformContext) -> dict[str, int]:
        fused = 0
        for module in graph_modules(gm):
            for linear in list(module.graph.nodes):
                act = _sole_gated_input(linear) if is_op(linear, LINEAR) else None
                if act is not None:
                    _fuse(module, linear, act)
                    fused += 1
        return {"gated_linear": fused}
