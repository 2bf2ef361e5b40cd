"""fuse_shared_input_linears: linears that read the same tensor -> one linear over stacked weights.

q/k/v projections (and gate/up of gated MLPs) all read the same normed hidden state. One GEMM over
the concatenated weights reads that input once, launches once and fills the GPU better at small
token counts; its output is sliced back into the original results (slices are views: the
consumers see the same values, and `gated_act`'s Triton backend reads the gate/up halves in place).

Quantized linears fuse too, with their own op (fp8_linear with fp8_linear, int_linear with
int_linear): every parameter with one row per output feature is stacked (weights, scales, zero
points, bias; a per-tensor FP8 weight scale becomes that scale repeated over its rows, which is
exact; FP8 block scales stack when every part fills whole blocks), and what the whole GEMM shares must be equal: the static FP8 input scale, GPTQ's act-order
`g_idx` (by value), the op's other arguments (act_quant, bits, group_size). Linears that differ only
there are left unfused and named in a warning. Running in the fusion stage, after weight loading,
treats both quantization transforms alike (online ones quantized each weight on its own, checkpoint
ones arrive quantized) and gives exactly the unfused numbers; the old parameters are deleted as
each group is stacked, so peak memory grows by one group's quantized tensors, not by a model.
Linears whose tensors are anything but plain, untied parameters (transposed Conv1D weights, tied
embeddings) are left alone.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
from torch import nn
from torch._guards import detect_fake_mode
from torch.fx import GraphModule, Node
from torch.utils._pytree import tree_map

from autodeploy.graph_utils import add_parameter, graph_modules, is_op
from autodeploy.kernels.quant_linear import ACT_GROUP_SIZE
from autodeploy.patterns.helpers import bind_args, insert_call, val
from autodeploy.quantization.rewrite import hf_path

from .registry import Stage, Transform, TransformConfig, TransformContext, register


@dataclass(frozen=True)
class _Layout:
    """Which tensor arguments of a linear op are per output row (stacked) and which the group shares."""

    stacked: tuple[str, ...]  # the first is the weight; optional ones must be given by all or none
    shared: tuple[str, ...] = ()  # must be equal (by value) across the group; the fused op reads one copy
    name: str = ""  # report key of the groups fused (empty: the unquantized op's qkv / gate_up counts only)


_LAYOUTS = {
    torch.ops.autodeploy.linear.default: _Layout(("weight", "bias")),
    torch.ops.autodeploy.fp8_linear.default: _Layout(("weight", "weight_scale", "bias"), ("input_scale",),
                                                     "fused_fp8_linear"),
    torch.ops.autodeploy.int_linear.default: _Layout(("qweight", "scales", "zeros", "bias"), ("g_idx",),
                                                     "fused_int_linear"),
}


def _fake(nodes: list[Node], value: torch.Tensor | None = None, dim: int = 0) -> torch.Tensor | None:
    """A FakeTensor for an inserted node: of `value`, else of cat([n.meta['val'] ...], dim)."""
    vals = [val(n) for n in nodes]
    mode = detect_fake_mode(vals) if all(v is not None for v in vals) else None
    if mode is None:
        return None
    if value is not None:
        return mode.from_tensor(value)
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
        node = add_parameter(self.gm, name, value, old[0])  # the fused projection may be a new module
        node.meta["val"] = _fake(old, value)
        for n in old:
            owner, _, old_attr = n.target.rpartition(".")
            delattr(self.gm.get_submodule(owner), old_attr)
        return node


def _signature(linear: Node, params: _Params) -> tuple | None:
    """What must agree for linears reading the same x to stack (None: this one cannot fuse).

    Per tensor argument: given or not, dtype, device and its shape past the rows; the other
    arguments by value. Shared tensors are compared by value separately (`_partition`)."""
    layout = _LAYOUTS[linear.target]
    key: list = [linear.target]
    for name, arg in bind_args(linear).items():
        if name == "x":
            continue
        if isinstance(arg, Node):
            tensor = params.tensor(arg)
            if tensor is None:
                return None
            rest = tuple(tensor.shape[1:]) if name in layout.stacked else tuple(tensor.shape)
            key.append((name, tensor.dtype, tensor.device, rest))
        else:
            key.append((name, arg))
    if not _whole_blocks(linear, params):
        return None
    return tuple(key)


def _whole_blocks(linear: Node, params: _Params) -> bool:
    """FP8 block weight scales ([N / G, K / G]) stack along N only when the linear's N fills whole blocks."""
    args = bind_args(linear)
    scale = params.tensor(args.get("weight_scale")) if isinstance(args.get("weight_scale"), Node) else None
    if scale is None or scale.dim() != 2:
        return True
    return params.tensor(args["weight"]).shape[0] % args.get("act_group_size", ACT_GROUP_SIZE) == 0


def _same_shared(a: Node, b: Node, params: _Params) -> bool:
    """Whether two linears of one signature have equal shared tensors (static input scale, g_idx)."""
    args_a, args_b = bind_args(a), bind_args(b)
    return all(args_a[n] is None or torch.equal(params.tensor(args_a[n]), params.tensor(args_b[n]))
               for n in _LAYOUTS[a.target].shared)


def _partition(linears: list[Node], params: _Params) -> list[list[Node]]:
    """Linears of one signature split into groups whose shared tensors are equal, in order."""
    groups: list[list[Node]] = []
    for linear in linears:
        group = next((g for g in groups if _same_shared(g[0], linear, params)), None)
        if group is None:
            groups.append([linear])
        else:
            group.append(linear)
    return groups


def _candidates(x: Node, params: _Params) -> list[list[Node]]:
    """x's linear readers (any of the ops above) that can stack, grouped by signature, in graph order."""
    by_signature: dict[tuple, list[Node]] = {}
    for user in x.users:
        if is_op(user, tuple(_LAYOUTS)) and user.args[0] is x:
            signature = _signature(user, params)
            if signature is not None:
                by_signature.setdefault(signature, []).append(user)
    order = {n: i for i, n in enumerate(x.graph.nodes)}
    return [sorted(g, key=order.__getitem__) for g in by_signature.values() if len(g) >= 2]


def _module_path(linear: Node) -> str:
    return linear.args[1].target.rpartition(".")[0]


def _kind(group: list[Node]) -> str:
    """qkv / gate_up by the projections' module names, else other."""
    names = {_module_path(n).rpartition(".")[2] for n in group}
    if names == {"q_proj", "k_proj", "v_proj"}:
        return "qkv"
    if names == {"gate_proj", "up_proj"} or any(is_op(u, torch.ops.autodeploy.gated_act) for n in group for u in n.users):
        return "gate_up"
    return "other"


def _fused_path(group: list[Node]) -> str:
    """model.layers.0.self_attn.{q,k,v}_proj -> model.layers.0.self_attn.q_k_v_proj."""
    module_paths = [_module_path(n) for n in group]
    parent = module_paths[0].rpartition(".")[0]
    stems = "_".join(path.rpartition(".")[2].removesuffix("_proj") for path in module_paths)
    return f"{parent}.{stems}_proj" if parent else f"{stems}_proj"


def _rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """A stacked tensor with one entry per output row: a per-tensor scale [] repeated over `rows`."""
    return tensor.expand(rows) if tensor.dim() == 0 else tensor


def _fuse(gm: GraphModule, group: list[Node], params: _Params) -> None:
    layout = _LAYOUTS[group[0].target]
    bound = [bind_args(n) for n in group]
    widths = [params.tensor(b[layout.stacked[0]]).shape[0] for b in bound]
    path = _fused_path(group)
    fused_params: dict[Node, Node] = {}  # group[0]'s parameter nodes -> the fused ones
    old_params: list[Node] = []
    for name in (*layout.stacked, *layout.shared):
        nodes = [b[name] for b in bound]
        if nodes[0] is None:
            continue
        if name in layout.stacked:
            value = torch.cat([_rows(params.tensor(n), w) for n, w in zip(nodes, widths)])
        else:
            value = params.tensor(nodes[0])
        attr = nodes[0].target.rpartition(".")[2]
        fused_params[nodes[0]] = params.replace(nodes, f"{path}.{attr}", value)
        old_params += nodes
    graph = gm.graph
    first = group[0]

    def fused_arg(a):
        return fused_params.get(a, a) if isinstance(a, Node) else a

    with graph.inserting_before(first):
        fused = graph.call_function(first.target, tree_map(fused_arg, first.args), tree_map(fused_arg, first.kwargs))
        fused.meta["val"] = _fake(group, dim=-1)
        start = 0
        for linear, width in zip(group, widths):
            linear.replace_all_uses_with(insert_call(graph, torch.ops.aten.slice.Tensor, (fused, -1, start, start + width)))
            start += width
    for node in [*group, *old_params]:
        graph.erase_node(node)


def _linear_ops(gm: GraphModule) -> dict[str, object]:
    """HF module path -> the linear op (of those above) reading its weight."""
    return {hf_path(n.args[1].target): n.target for m in graph_modules(gm) for n in m.graph.nodes
            if is_op(n, tuple(_LAYOUTS)) and isinstance(n.args[1], Node) and n.args[1].op == "get_attr"}


@register
class FuseSharedInputLinears(Transform):
    name = "fuse_shared_input_linears"
    stage = Stage.FUSION

    def __init__(self, config: TransformConfig | None = None):
        super().__init__(config)
        self._ops_by_path: dict[str, object] = {}  # HF module path -> the linear op reading its weight, before fusing
        self._left: Counter = Counter()  # kinds of groups left unfused, named in a warning

    def apply(self, gm: GraphModule, ctx: TransformContext) -> dict[str, int]:
        counts = {"qkv": 0, "gate_up": 0, "other": 0}
        self._ops_by_path = _linear_ops(gm)
        for module in graph_modules(gm):
            params = _Params(module)
            for node in list(module.graph.nodes):
                for candidates in _candidates(node, params):
                    groups = _partition(candidates, params)
                    if len(groups) > 1:
                        self._warn_unequal(candidates)
                    for group in groups:
                        if len(group) < 2:
                            continue
                        counts[_kind(group)] += 1
                        report_key = _LAYOUTS[group[0].target].name
                        if report_key:
                            counts[report_key] = counts.get(report_key, 0) + 1
                        _fuse(module, group, params)
        return counts

    def _warn_unequal(self, linears: list[Node]) -> None:
        shared = "/".join(_LAYOUTS[linears[0].target].shared)
        self._left[_kind(linears)] += 1
        self.warnings.append(f"fuse_shared_input_linears: {', '.join(_module_path(n) for n in linears)} read the same "
                             f"input but their {shared} differ: fused only where equal")

    def expected(self, gm: GraphModule, ctx: TransformContext) -> dict[str, int]:
        """One qkv per attention module with separate q/k/v projections, one gate_up per gated MLP with
        separate gate/up projections, where those run the same op (all quantized alike or none), less
        the groups a warning already names."""
        ops = self._ops_by_path

        def has(path: str, module: nn.Module, *names: str) -> bool:
            same_op = len({ops.get(f"{path}.{n}") for n in names}) == 1
            return same_op and all(isinstance(getattr(module, n, None), nn.Linear) for n in names)

        modules = list(ctx.meta_model.named_modules())
        return {"qkv": sum(has(p, m, "q_proj", "k_proj", "v_proj") for p, m in modules) - self._left["qkv"],
                "gate_up": sum(has(p, m, "gate_proj", "up_proj") for p, m in modules) - self._left["gate_up"]}
