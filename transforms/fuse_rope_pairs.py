"""fuse_rope_pairs: rope(q, cos, sin) and rope(k, cos, sin) -> autodeploy::rope_pair(q, k, cos, sin).

A decoder layer rotates q and k with the same cos/sin: two launches of a kernel that takes about a
microsecond, 2 x layers of a decode step's ~350 kernels at batch 1. The pair op rotates both in one
launch (the same arithmetic, element for element). Ropes are paired in graph order among those sharing
cos, sin and the rotation form; a pair is fused only where one node can stand for both: every reader of
the first comes after the second, and the second's input does not depend on the first.
"""

from __future__ import annotations

import operator

import torch
from torch.fx import GraphModule, Node

from autodeploy.graph_utils import graph_modules, inherit_meta, is_op
from autodeploy.patterns.helpers import insert_call, val

from .registry import Stage, Transform, TransformContext, register

ROPE = torch.ops.autodeploy.rope.default
PAIR = torch.ops.autodeploy.rope_pair.default


def _operands(rope: Node) -> tuple:
    """(x, cos, sin, interleaved) of a rope node, the default filled in."""
    x, cos, sin, *rest = rope.args
    return x, cos, sin, rest[0] if rest else rope.kwargs.get("interleaved", False)


def _compatible(q: Node, k: Node) -> bool:
    """Both 4-d [b, heads, tokens, head_dim] of one dtype, differing at most in their heads."""
    vq, vk = val(q), val(k)
    return (vq is not None and vk is not None and vq.dim() == vk.dim() == 4 and vq.dtype == vk.dtype
            and (vq.shape[0], vq.shape[2], vq.shape[3]) == (vk.shape[0], vk.shape[2], vk.shape[3]))


def _depends_on(node: Node, ancestor: Node, order: dict[Node, int]) -> bool:
    """Whether `node` is computed from `ancestor` (only nodes after the ancestor can be)."""
    stack, seen = [node], set()
    while stack:
        current = stack.pop()
        if current is ancestor:
            return True
        if current in seen or order[current] < order[ancestor]:
            continue
        seen.add(current)
        stack.extend(current.all_input_nodes)
    return False


def _fusable(first: Node, second: Node, order: dict[Node, int]) -> bool:
    q, k = _operands(first)[0], _operands(second)[0]
    return (_compatible(q, k) and all(order[user] > order[second] for user in first.users)
            and not _depends_on(k, first, order))


def _fuse(module: GraphModule, first: Node, second: Node) -> None:
    graph = module.graph
    q, cos, sin, interleaved = _operands(first)
    k = _operands(second)[0]
    with graph.inserting_before(second):
        pair = insert_call(graph, PAIR, (q, k, cos, sin, interleaved))
        q_out = insert_call(graph, operator.getitem, (pair, 0))
        k_out = insert_call(graph, operator.getitem, (pair, 1))
    inherit_meta(pair, second)
    first.replace_all_uses_with(q_out)
    second.replace_all_uses_with(k_out)
    graph.erase_node(first)
    graph.erase_node(second)


@register
class FuseRopePairs(Transform):
    name = "fuse_rope_pairs"
    stage = Stage.FUSION

    def apply(self, gm: GraphModule, ctx: TransformContext) -> dict[str, int]:
        fused = 0
        for module in graph_modules(gm):
            groups: dict[tuple, list[Node]] = {}
            for node in module.graph.nodes:
                if is_op(node, ROPE):
                    groups.setdefault(_operands(node)[1:], []).append(node)
            for ropes in groups.values():
                for first, second in zip(ropes[0::2], ropes[1::2]):
                    if _fusable(first, second, {n: i for i, n in enumerate(module.graph.nodes)}):
                        _fuse(module, first, second)
                        fused += 1
        return {"rope_pair": fused}
