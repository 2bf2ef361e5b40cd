"""Shared node-level helpers for the matchers.

HF code sprinkles value-preserving ops between the ops that define a pattern: dtype casts
(`.float()`, `.to(dtype)`, `type_as`), `contiguous`, `clone`, `alias`, inference-mode dropout.
Matchers compare tensors *modulo* those ops (`strip` backwards, `advance` forwards), so one matcher
covers fp32 and bf16 exports and the small code differences between model families.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, TypeVar

import torch
from torch._guards import detect_fake_mode
from torch.fx import Graph, GraphModule, Node
from torch.utils._pytree import tree_leaves, tree_map

import autodeploy.kernels  # noqa: F401  (registers torch.ops.autodeploy.*, used in LINEAR_OPS)
from autodeploy.graph_utils import graph_modules, is_op

aten = torch.ops.aten

_VALUE_PRESERVING = (aten.to, aten._to_copy, aten.type_as, aten.contiguous, aten.clone, aten.alias, aten.detach)
# Matchers that look for a projection accept the linear both before and after match_linear.
LINEAR_OPS = (aten.linear, torch.ops.autodeploy.linear)
VIEWS = (aten.view, aten.reshape, aten._unsafe_view)  # the same elements in another shape

M = TypeVar("M")


def val(node: Any) -> torch.Tensor | None:
    """The FakeTensor export recorded for `node` (None for non-nodes or nodes without one)."""
    return node.meta.get("val") if isinstance(node, Node) else None


def bind_args(node: Node) -> dict[str, Any]:
    """A call_function node's arguments by schema name, defaults filled in (OpOverload targets)."""
    schema = node.target._schema
    bound: dict[str, Any] = {}
    for i, arg in enumerate(schema.arguments):
        if i < len(node.args) and not arg.kwarg_only:
            bound[arg.name] = node.args[i]
        elif arg.name in node.kwargs:
            bound[arg.name] = node.kwargs[arg.name]
        elif arg.has_default_value():
            bound[arg.name] = arg.default_value
    return bound


def _is_inactive_dropout(node: Node) -> bool:
    if not is_op(node, aten.dropout):
        return False
    args = bind_args(node)
    return args["p"] == 0 or not args["train"]


def is_value_preserving(node: Any) -> bool:
    """Whether `node` returns its first argument's values (possibly in another dtype or layout)."""
    return isinstance(node, Node) and (is_op(node, _VALUE_PRESERVING) or _is_inactive_dropout(node))


def _is_lossless(node: Node) -> bool:
    """Whether `node`'s output dtype holds its input's values exactly (an upcast or no cast)."""
    src, out = val(node.args[0]), val(node)
    return src is not None and out is not None and torch.promote_types(src.dtype, out.dtype) == out.dtype


def strip(node: Any, exact: bool = False) -> Any:
    """Walk back through value-preserving ops to the tensor they came from.

    With exact=True only through lossless ones: use it where the result becomes an op's operand
    (stripping `h.to(bf16).float()` to h would drop the rounding the model does); the default is
    for recognising structure, where any cast is transparent.
    """
    while is_value_preserving(node) and (not exact or _is_lossless(node)):
        node = node.args[0]
    return node


def sole_user(node: Node) -> Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def advance(node: Node, stop: Callable[[Node], bool] = lambda n: False) -> Node:
    """Walk forward through a chain of single-user value-preserving ops, until `stop(node)`."""
    while not stop(node):
        user = sole_user(node)
        if user is None or not is_value_preserving(user) or user.args[0] is not node:
            break
        node = user
    return node


def same_tensor(a: Any, b: Any) -> bool:
    return isinstance(a, Node) and strip(a) is strip(b)


def scalar(arg: Any) -> float | None:
    """`arg` as a float when it is a Python number constant in the graph, else None."""
    if isinstance(arg, (int, float)) and not isinstance(arg, bool):
        return float(arg)
    return None


def binary_operands(node: Node, ops) -> tuple[Any, Any] | None:
    """(lhs, rhs) when `node` is one of the binary `ops`, else None."""
    if not is_op(node, ops) or len(node.args) < 2:
        return None
    return node.args[0], node.args[1]


def split_scalar(node: Node, ops) -> tuple[Node, float] | None:
    """For a binary op with one tensor and one constant operand: (tensor, constant)."""
    operands = binary_operands(node, ops)
    if operands is None:
        return None
    for tensor, const in (operands, operands[::-1]):
        if isinstance(tensor, Node) and scalar(const) is not None:
            return tensor, scalar(const)
    return None


def is_last_dim(dim: int, node: Node) -> bool:
    """Whether `dim` indexes the last dimension of `node`'s tensor."""
    ndim = val(node).dim()
    return dim % ndim == ndim - 1


def insert_call(graph: Graph, target, args: tuple) -> Node:
    """`graph.call_function(target, args)` at the current insertion point, with its FakeTensor in meta.

    Matchers read shapes and dtypes from meta["val"]; a node a transform inserts without one (e.g.
    cos/sin derived from complex frequencies) would be opaque to every matcher that runs after it.
    """
    node = graph.call_function(target, args)
    fake_args = tree_map(lambda a: val(a) if isinstance(a, Node) else a, args)
    known = all(val(a) is not None for a in tree_leaves(args) if isinstance(a, Node))
    mode = detect_fake_mode(tree_leaves(fake_args)) if known else None
    if mode is not None:
        with mode:
            node.meta["val"] = target(*fake_args)
    return node


def find_matches(gm: GraphModule, matcher: Callable[[Node], M | None]) -> Iterator[tuple[GraphModule, M]]:
    """Try `matcher` on every node of `gm` and its nested graphs, in order; yield (graph module, match).

    Lazy on purpose: the caller rewrites each match before the next one is searched for, so a
    match that consumes an earlier match's output sees the rewritten node, not the dead subgraph.
    """
    for module in graph_modules(gm):
        for node in list(module.graph.nodes):
            if node.op == "call_function":
                match = matcher(node)
                if match is not None:
                    yield module, match
