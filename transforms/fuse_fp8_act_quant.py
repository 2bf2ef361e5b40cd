"""fuse_fp8_act_quant: quantize each FP8 linear's activations once, where they are produced.

`fp8_linear(x, ..., act_quant="token")` quantizes x inside the GEMM. Measured on an H200 at decode, a
GEMM that reads x already in e4m3 streams its weights ~1.5-2x faster than one that finds each row's amax
and scales every tile itself (BENCHMARKS.md), so the graph is rewritten:
    fp8_linear(x)  ->  q, s = quantize_fp8_per_token(x);  fp8_linear_quantized_input(q, s, ...)
with one quantization per tensor and scale layout whatever the number of linears reading it, and where x
is the normalized output of a residual add + RMSNorm read by nothing else, the quantization moves into
that kernel:
    fused_add_rms_norm(a, b) -> (normed, a + b)  ->  fused_add_rms_norm_quant_fp8(a, b) -> (q, s, a + b)
and where x is a gated MLP's act(gate) * up read by nothing else, into that kernel (one launch less per layer):
    gated_act(gate, up) -> h  ->  gated_act_quant_fp8(gate, up) -> (q, s)
Per-token-group scales (`act_quant="group"`) take the same path, the group size passed to all three ops, and so
do static input scales (FP8 checkpoints), the scale passed to them (one quantization per tensor and scale: the
linears reading one tensor may carry different static scales). Linears with per-tensor dynamic scales (one amax
over every row) are left as they are. The numbers do not change: the ops compose to fp8_linear's reference exactly
(kernels/quant_act.py).
"""

from __future__ import annotations

import operator

import torch
from torch.fx import GraphModule, Node

from autodeploy.graph_utils import graph_modules, inherit_meta, is_op, replace_with_call
from autodeploy.patterns.helpers import bind_args, insert_call, val

from .registry import Stage, Transform, TransformContext, register

FP8_LINEAR = torch.ops.autodeploy.fp8_linear.default
QUANTIZE = torch.ops.autodeploy.quantize_fp8_per_token.default
QUANTIZED_INPUT = torch.ops.autodeploy.fp8_linear_quantized_input.default
ADD_NORM = torch.ops.autodeploy.fused_add_rms_norm.default
ADD_NORM_QUANT = torch.ops.autodeploy.fused_add_rms_norm_quant_fp8.default
GATED_ACT = torch.ops.autodeploy.gated_act.default
GATED_ACT_QUANT = torch.ops.autodeploy.gated_act_quant_fp8.default


def _row_quantization(node: Node) -> tuple[int, Node | None] | None:
    """(activation group size, static input scale node) of an fp8_linear whose activation scales are per row or
    per row and group (group size -1: one per row; a static scale counts as one per row), or None (per-tensor
    dynamic scales)."""
    args = bind_args(node)
    if isinstance(args["input_scale"], Node):  # a parameter (get_attr or placeholder) can move up the graph
        return (-1, args["input_scale"]) if args["input_scale"].op in ("get_attr", "placeholder") else None
    if args["act_quant"] not in ("token", "group"):
        return None
    return (args["act_group_size"] if args["act_quant"] == "group" else -1), None


def _hoist(graph, param: Node | None) -> None:
    """A static scale's get_attr moved to the top of the graph (it reads nothing), so that a quantization placed
    anywhere may read it."""
    if param is not None and param.op == "get_attr":
        first = next(n for n in graph.nodes if n.op != "placeholder")
        if first is not param:
            first.prepend(param)


def _quantize_once(graph, x: Node, group_size: int, input_scale: Node | None) -> tuple[Node, Node]:
    """(q, scale) nodes of x, placed right after x."""
    _hoist(graph, input_scale)
    with graph.inserting_after(x):
        quant = insert_call(graph, QUANTIZE, (x, group_size, input_scale))
    with graph.inserting_after(quant):
        scale = insert_call(graph, operator.getitem, (quant, 1))
        q = insert_call(graph, operator.getitem, (quant, 0))
    return q, scale


def _split_linears(gm: GraphModule) -> tuple[int, list[tuple[Node, Node]]]:
    """Every fp8_linear with scales per row (per token, per token and group, static) ->
    fp8_linear_quantized_input; returns (how many, [(x, quantize node)])."""
    graph = gm.graph
    quantized: dict[tuple[Node, int, Node | None], tuple[Node, Node]] = {}
    for node in list(graph.nodes):
        rows = _row_quantization(node) if is_op(node, FP8_LINEAR) else None
        if rows is None or val(node.args[0]) is None:
            continue
        args = bind_args(node)
        key = (args["x"], *rows)
        if key not in quantized:
            quantized[key] = _quantize_once(graph, *key)
        q, scale = quantized[key]
        replace_with_call(gm, node, QUANTIZED_INPUT, (q, scale, args["weight"], args["weight_scale"], args["bias"],
                                                      val(args["x"]).dtype, rows[0]))
        graph.erase_node(node)
    linears = sum(len(q.users) for q, _ in quantized.values())  # q's readers: the rewritten linears
    return linears, [(key[0], q.args[0]) for key, (q, _) in quantized.items()]


def _take_over_quantization(gm: GraphModule, quant: Node, new: Node) -> None:
    """The getitems of the standalone quantization `quant` read (q, scale) from `new`'s outputs 0 and 1."""
    graph = gm.graph
    with graph.inserting_after(new):
        scale = insert_call(graph, operator.getitem, (new, 1))
        q = insert_call(graph, operator.getitem, (new, 0))
    for user in list(quant.users):
        user.replace_all_uses_with(q if user.args[1] == 0 else scale)
        graph.erase_node(user)
    graph.erase_node(quant)


def _fold_into_norm(gm: GraphModule, normed: Node, quant: Node) -> bool:
    """normed = fused_add_rms_norm(...)[0] read only by `quant`: one fused_add_rms_norm_quant_fp8 instead."""
    fused = normed.args[0] if normed.target is operator.getitem and normed.args[1] == 0 else None
    if fused is None or not is_op(fused, ADD_NORM) or len(normed.users) != 1:
        return False
    graph = gm.graph
    with graph.inserting_after(fused):
        new = insert_call(graph, ADD_NORM_QUANT, (*fused.args, *quant.args[1:]))
    inherit_meta(new, fused)
    with graph.inserting_after(new):
        added = insert_call(graph, operator.getitem, (new, 2))
    _take_over_quantization(gm, quant, new)
    graph.erase_node(normed)
    for user in list(fused.users):  # getitem 1: the residual sum
        user.replace_all_uses_with(added)
        graph.erase_node(user)
    graph.erase_node(fused)
    return True


def _fold_into_gated_act(gm: GraphModule, h: Node, quant: Node) -> bool:
    """h = gated_act(gate, up, act) read only by `quant`: one gated_act_quant_fp8 instead."""
    if not is_op(h, GATED_ACT) or len(h.users) != 1:
        return False
    args = bind_args(h)
    if val(args["gate"]) is None or val(args["gate"]).shape != val(args["up"]).shape:
        return False
    graph = gm.graph
    with graph.inserting_after(h):
        new = insert_call(graph, GATED_ACT_QUANT, (args["gate"], args["up"], args["activation"], *quant.args[1:]))
    inherit_meta(new, h)
    _take_over_quantization(gm, quant, new)
    graph.erase_node(h)
    return True


@register
class FuseFP8ActQuant(Transform):
    name = "fuse_fp8_act_quant"
    stage = Stage.FUSION

    def apply(self, gm: GraphModule, ctx: TransformContext) -> dict[str, int]:
        linears = quantizations = into_norm = into_gated_act = 0
        for module in graph_modules(gm):
            split, quants = _split_linears(module)
            linears += split
            quantizations += len(quants)
            for x, quant in quants:
                if _fold_into_norm(module, x, quant):
                    into_norm += 1
                else:
                    into_gated_act += _fold_into_gated_act(module, x, quant)
        return {"fp8_linears_on_quantized_input": linears, "activation_quantizations": quantizations,
                "quantizations_in_rms_norm": into_norm, "quantizations_in_gated_act": into_gated_act}
