"""fuse_shared_input_linears: linears that read the same tensor -> one linear over stacked weights.

q/k/v projections (and gate/up of gated MLPs) all read the same normed hidden state. One GEMM over
the concatenated weights reads that input once, launches once and fills the GPU better at small
token counts; its output is sliced back into the original results (slices are views: the
consumers see the same values, and `gated_act`'s Triton backend reads the gate/up halves in place).
Weights are concatenated here, after weight loading, and the old parameters are deleted, so the
model's weights are not held twice. Linears whose weight is anything but a plain, untied parameter
(transposed Conv1D weights, tied embeddings, quantized weights) are left alone.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch import nn
from torch._guards import detect_fake_mode
from torch.fx import GraphModule, Node

from autodeploy.graph_utils import graph_modules, is_op
from autodeploy.patterns.helpers import insert_call, val
from autodeploy.quantization.rewrite import quantized_module_paths

from .registry import Stage, Transform, TransformContext, register

LINEAR = torch.ops.autodeploy.linear.default


def _fake_cat(nodes: list[Node], dim: int) -> torch.Tensor | None:
    """The FakeTensor of cat([n.meta['val'] ...], dim), so inserted nodes keep shapes in meta."""
    vals = [val(n) for n in nodes]
    mode = detect_fake_mode(vals) if all(v is not None for v in vals) else None
    if mode is None:
        return None
    with mode:
        return torch.cat(vals, dim)


class _Params:
    """The GraphModule's parameters by name, and how many names each tensor has (tied weights)."""

    def __init__(self, gm: GraphModule):
        self.gm = gm
        self.names = Counter(id(t) for _, t in gm.named_parameters(remove_duplicate=False))
        self.names.update(id(t) for _, t in gm.named_buffers(remove_duplicate=False))

    def tensor(self, node: Node | None) -> torch.Tensor | None:
        """The parameter a get_attr node reads, if this node is its only reader and it has one name."""
        if node is None or node.op != "get_attr" or len(node.users) != 1:
            return None
        owner, _, attr = node.target.rpartition(".")
        tensor = getattr(self.gm.get_submodule(owner), attr, None)
        return tensor if isinstance(tensor, torch.Tensor) and self.names[id(tensor)] == 1 else None

    def replace(self, old: list[Node], name: str, value: torch.Tensor) -> Node:
        """Register `value` as parameter `name`, get_attr it before old[0], delete the old ones."""
        owner_path, _, attr = name.rpartition(".")
        owner = self.gm
        for part in owner_path.split(".") if owner_path else []:  # the fused projection is a new module
            if not hasattr(owner, part):
                owner.add_module(part, nn.Module())
            owner = getattr(owner, part)
        owner.register_parameter(attr, nn.Parameter(value, requires_grad=False))
        with self.gm.graph.inserting_before(old[0]):
            node = self.gm.graph.get_attr(name)
        node.meta["val"] = _fake_cat(old, 0)
        for n in old:
            owner, _, old_attr = n.target.rpartition(".")
            delattr(self.gm.get_submodule(owner), old_attr)
        return node


def _fusable(linear: Node, params: _Params) -> bool:
    x, weight, *rest = linear.args
    bias = rest[0] if rest else linear.kwargs.get("bias")
    return params.tensor(weight) is not None and (bias is None or params.tensor(bias) is not None)


def _groups(x: Node, params: _Params) -> list[list[Node]]:
    """x's fusable linear readers, grouped by what must agree to stack them (bias or not, weight dtype)."""
    groups: dict[tuple, list[Node]] = {}
    for user in x.users:
        if is_op(user, LINEAR) and user.args[0] is x and _fusable(user, params):
            weight = params.tensor(user.args[1])
            has_bias = len(user.args) > 2 and user.args[2] is not None
            groups.setdefault((has_bias, weight.dtype, weight.device), []).append(user)
    order = {n: i for i, n in enumerate(x.graph.nodes)}
    return [sorted(g, key=order.__getitem__) for g in groups.values() if len(g) >= 2]


def _kind(group: list[Node]) -> str:
    """qkv / gate_up by the projections' module names, else other."""
    names = {n.args[1].target.split(".")[-2] for n in group}
    if names == {"q_proj", "k_proj", "v_proj"}:
        return "qkv"
    if names == {"gate_proj", "up_proj"} or any(is_op(u, torch.ops.autodeploy.gated_act) for n in group for u in n.users):
        return "gate_up"
    return "other"


def _fused_name(group: list[Node]) -> str:
    """model.layers.0.self_attn.{q,k,v}_proj.weight -> model.layers.0.self_attn.q_k_v_proj.weight."""
    module_paths = [n.args[1].target.rpartition(".")[0] for n in group]
    parent = module_paths[0].rpartition(".")[0]
    stems = "_".join(path.rpartition(".")[2].removesuffix("_proj") for path in module_paths)
    return f"{parent}.{stems}_proj.weight" if parent else f"{stems}_proj.weight"


def _stack(params: _Params, nodes: list[Node], name: str) -> Node:
    """One parameter `name` holding the tensors `nodes` read, stacked along dim 0."""
    return params.replace(nodes, name, torch.cat([params.tensor(n) for n in nodes]))


def _fuse(gm: GraphModule, group: list[Node], params: _Params) -> None:
    weights = [n.args[1] for n in group]
    biases = [n.args[2] for n in group] if len(group[0].args) > 2 and group[0].args[2] is not None else []
    widths = [params.tensor(w).shape[0] for w in weights]
    name = _fused_name(group)
    weight = _stack(params, weights, name)
    bias = _stack(params, biases, name.removesuffix("weight") + "bias") if biases else None
    graph = gm.graph
    with graph.inserting_before(group[0]):
        fused = graph.call_function(LINEAR, (group[0].args[0], weight, bias))
        fused.meta["val"] = _fake_cat(group, -1)
        start = 0
        for linear, width in zip(group, widths):
            linear.replace_all_uses_with(insert_call(graph, torch.ops.aten.slice.Tensor, (fused, -1, start, start + width)))
            start += width
    for node in [*group, *weights, *biases]:
        graph.erase_node(node)


@register
class FuseSharedInputLinears(Transform):
    name = "fuse_shared_input_linears"
    stage = Stage.FUSION

    def apply(self, gm: GraphModule, ctx: TransformContext) -> dict[str, int]:
        counts = {"qkv": 0, "gate_up": 0, "other": 0}
        for module in graph_modules(gm):
            params = _Params(module)
            for node in list(module.graph.nodes):
                for group in _groups(node, params):
                    counts[_kind(group)] += 1
                    _fuse(module, group, params)
        return counts

    def expected(self, gm: GraphModule, ctx: TransformContext) -> dict[str, int]:
        """One qkv per attention module with separate q/k/v projections, one gate_up per gated MLP
        with separate gate/up projections."""

        quantized = quantized_module_paths(gm)  # left alone, see the module docstring

        def has(path: str, module: nn.Module, *names: str) -> bool:
            return all(isinstance(getattr(module, n, None), nn.Linear) and f"{path}.{n}" not in quantized
                       for n in names)

        modules = list(ctx.meta_model.named_modules())
        return {"qkv": sum(has(p, m, "q_proj", "k_proj", "v_proj") for p, m in modules),
                "gate_up": sum(has(p, m, "gate_proj", "up_proj") for p, m in modules)}
