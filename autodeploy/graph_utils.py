"""Small FX helpers shared by transforms and the pipeline."""

from __future__ import annotations

import operator
from typing import Iterator

import torch
from torch._guards import detect_fake_mode
from torch.fx import GraphModule, Node


def graph_modules(gm: GraphModule) -> Iterator[GraphModule]:
    """`gm` and the GraphModules nested in it (export puts e.g. no_grad regions in submodules)."""
    for module in gm.modules():
        if isinstance(module, GraphModule):
            yield module


def is_op(node: Node, ops) -> bool:
    """Whether `node` calls one of `ops` (an OpOverload, an OpOverloadPacket, or a collection)."""
    if node.op != "call_function":
        return False
    if not isinstance(ops, (list, tuple, set, frozenset)):
        ops = (ops,)
    for op in ops:
        if node.target is op:
            return True
        if isinstance(op, torch._ops.OpOverloadPacket) and getattr(node.target, "overloadpacket", None) is op:
            return True
    return False


def count_nodes(gm: GraphModule) -> int:
    return sum(len(m.graph.nodes) for m in graph_modules(gm))


def finalize(gm: GraphModule) -> None:
    """Drop dead code, lint, recompile: what every transform does after rewriting."""
    for module in graph_modules(gm):  # all first: dead-code elimination lints the nested graphs too
        _unique_names(module.graph)
    for module in graph_modules(gm):
        module.graph.eliminate_dead_code()
        module.graph.lint()
        module.recompile()
    gm.delete_all_unused_submodules()


def _unique_names(graph: torch.fx.Graph) -> None:
    """Give each node a name of its own. A nested graph whose placeholders were named outside the graph's
    namespace (HRM's loop bodies hold `getitem_9`) lets a node a transform adds take a name a placeholder has."""
    names = {node.name for node in graph.nodes}
    seen: set[str] = set()
    for node in graph.nodes:
        if node.name in seen:
            suffix = 1
            while f"{node.name}_{suffix}" in names:
                suffix += 1
            node.name = f"{node.name}_{suffix}"
            names.add(node.name)
        seen.add(node.name)


def inherit_meta(new: Node, old: Node, with_val: bool = False) -> None:
    """Give `new` the source provenance of `old` (module stack, stack trace), and its fake value when it stands
    for `old` whole (`with_val`)."""
    keys = ("val", "nn_module_stack", "stack_trace") if with_val else ("nn_module_stack", "stack_trace")
    new.meta.update({k: v for k, v in old.meta.items() if k in keys})


def replace_with_call(gm: GraphModule, anchor: Node, target, args: tuple, kwargs: dict | None = None) -> Node:
    """Insert `target(*args, **kwargs)` before `anchor`, reroute anchor's users to it, keep metadata."""
    with gm.graph.inserting_before(anchor):
        new = gm.graph.call_function(target, args, kwargs or {})
    inherit_meta(new, anchor, with_val=True)
    anchor.replace_all_uses_with(new)
    return new


def add_parameter(gm: GraphModule, name: str, value: torch.Tensor, before: Node) -> Node:
    """Register `value` as frozen parameter `name` (a dotted path; missing owner modules are made) and
    get_attr it before `before`. The caller sets the node's meta["val"]."""
    owner_path, _, attr = name.rpartition(".")
    owner = gm
    for part in owner_path.split(".") if owner_path else []:
        if not hasattr(owner, part):
            owner.add_module(part, torch.nn.Module())
        owner = getattr(owner, part)
    owner.register_parameter(attr, torch.nn.Parameter(value, requires_grad=False))
    with gm.graph.inserting_before(before):
        return gm.graph.get_attr(name)


def attr_tensor(gm: GraphModule, node: Node | None) -> torch.Tensor | None:
    """The parameter (or buffer) a get_attr node reads; None for None."""
    return None if node is None else operator.attrgetter(node.target)(gm)


def add_weight_copy(gm: GraphModule, anchor: Node, name: str, value: torch.Tensor) -> Node:
    """`value` (a re-laid-out copy of a weight) as parameter `name`, read by a get_attr before anchor, with a
    fake value when the graph's nodes have them."""
    node = add_parameter(gm, name, value, anchor)
    mode = detect_fake_mode([anchor.meta.get("val")])
    if mode is not None:
        node.meta["val"] = mode.from_tensor(value)
    return node


def drop_parameter(gm: GraphModule, node: Node) -> None:
    """Erase get_attr `node` if nothing uses it any more and delete its parameter unless another node still reads
    it, so a weight replaced by a re-laid-out one frees its memory."""
    if node.users:
        return
    gm.graph.erase_node(node)
    if not any(n.op == "get_attr" and n.target == node.target for n in gm.graph.nodes):
        owner, _, attr = node.target.rpartition(".")
        delattr(gm.get_submodule(owner), attr)


def module_path(node: Node) -> str | None:
    """The HF module (e.g. 'model.layers.3.self_attn') a node was traced from, if recorded."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    return path


def get_submodule_or_none(model: torch.nn.Module, path: str | None, prefix: str = "") -> torch.nn.Module | None:
    if path is None:
        return None
    path = path.removeprefix(prefix)
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def distinct_tensors(module: torch.nn.Module) -> dict[int, torch.Tensor]:
    """The module's parameters and buffers by identity (tied weights once)."""
    return {id(t): t for t in list(module.parameters()) + list(module.buffers())}


def weight_bytes(module: torch.nn.Module) -> int:
    """Bytes of the distinct parameters and buffers (meta placeholders count as their final size)."""
    return sum(t.numel() * t.element_size() for t in distinct_tensors(module).values())
