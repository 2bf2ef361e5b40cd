"""The loops the rewriting transforms share: find matches and replace each output with a canonical op, or try a
rewrite on every call of some ops."""

from __future__ import annotations

from typing import Callable, TypeVar

import torch
from torch.fx import Graph, GraphModule, Node

from autodeploy.graph_utils import graph_modules, is_op, replace_with_call
from autodeploy.patterns.helpers import find_matches

M = TypeVar("M")


def _mutates(node: Node) -> bool:
    schema = getattr(node.target, "_schema", None)
    return isinstance(node.target, torch._ops.OpOverload) and schema is not None and schema.is_mutable


def erase_dead_subgraph(graph: Graph, node: Node) -> None:
    """Erase `node` (no users) and every producer that becomes unused, unless it mutates state.

    FX's dead-code elimination keeps ops it deems impure, including non-mutating random ones (sdpa,
    dropout with p=0), which would keep a replaced attention subgraph, softmax and all, alive.
    """
    inputs = node.all_input_nodes
    graph.erase_node(node)
    for producer in inputs:
        if producer.op == "call_function" and not producer.users and not _mutates(producer):
            erase_dead_subgraph(graph, producer)


def replace_matches(
    gm: GraphModule,
    matcher: Callable[[Node], M | None],
    op,
    operands: Callable[[M], tuple | None],
) -> int:
    """Replace `match.output` by `op(*operands(match))` for every match; return how many.

    `operands` returns None to leave a match alone. The matched subgraph is erased as it dies.
    """
    count = 0
    for module, match in find_matches(gm, matcher):
        args = operands(match)
        if args is not None:
            replace_with_call(module, match.output, op, args)
            erase_dead_subgraph(module.graph, match.output)
            count += 1
    return count


def rewrite_each(gm: GraphModule, ops: tuple, rewrite: Callable[[Graph, Node], bool]) -> int:
    """`rewrite(graph, node)` on every node calling one of `ops`, in every (sub)graph; how many it rewrote."""
    return sum(rewrite(module.graph, node) for module in graph_modules(gm) for node in list(module.graph.nodes)
               if is_op(node, ops))
