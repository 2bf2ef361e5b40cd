"""The graph side shared by both quantization transforms: find the linears and experts, swap their ops.

A quantized layer's parameters replace the full-precision ones on the same module (names as the op
reads them: weight / weight_scale / input_scale for fp8, qweight / scales / zeros / g_idx for int),
as placeholders on the meta device until `load_weights` builds them (see loading.py).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn
from torch._guards import detect_fake_mode
from torch.fx import GraphModule, Node

from autodeploy.errors import QuantizationError
from autodeploy.export import WRAPPER_PREFIX
from autodeploy.graph_utils import inherit_meta, is_op
from autodeploy.patterns.helpers import bind_args, val
from autodeploy.patterns.moe import stored_expert_weight

from .schemes import LinearScheme

LINEAR = torch.ops.autodeploy.linear.default
MOE = torch.ops.autodeploy.moe.default


@dataclass
class LinearSite:
    module: GraphModule  # the (sub)graph holding the node
    node: Node
    path: str  # the HF module path of the weight's owner, e.g. model.layers.0.self_attn.q_proj
    out_features: int
    in_features: int
    prefix: str = ""  # the (sub)graph's path in the root module, as parameter names start
    shared: bool = False  # another op reads the weight too (an LM head that is also the embedding table)


def _single_name_params(gm: GraphModule) -> Counter:
    names = Counter(id(t) for _, t in gm.named_parameters(remove_duplicate=False))
    names.update(id(t) for _, t in gm.named_buffers(remove_duplicate=False))
    return names


def _plain_param(module: GraphModule, node: Node, names: Counter) -> torch.Tensor | None:
    """The tensor a get_attr node reads, if it is stored as is (not transposed) and not tied."""
    if not isinstance(node, Node) or node.op != "get_attr":
        return None
    owner, _, attr = node.target.rpartition(".")
    tensor = getattr(module.get_submodule(owner), attr, None)
    return tensor if isinstance(tensor, torch.Tensor) and names[id(tensor)] == 1 else None


def hf_path(target: str) -> str:
    """get_attr target -> HF module path (wrapper prefix and parameter name dropped)."""
    return target.removeprefix(WRAPPER_PREFIX).rpartition(".")[0]


def linear_sites(gm: GraphModule) -> Iterator[LinearSite]:
    """Every autodeploy::linear whose weight is a plain, untied [out, in] parameter; `shared` where another op of
    the graph reads that parameter too (tied in the graph: its get_attr has other users, or another get_attr reads
    it), which a quantized replacement would take away from that op."""
    names = _single_name_params(gm)
    for prefix, module in _graphs(gm):
        reads = Counter(n.target for n in module.graph.nodes if n.op == "get_attr")
        for node in list(module.graph.nodes):
            if not is_op(node, LINEAR):
                continue
            weight = _plain_param(module, node.args[1], names)
            if weight is not None and weight.dim() == 2:
                shared = len(node.args[1].users) > 1 or reads[node.args[1].target] > 1
                yield LinearSite(module, node, hf_path(node.args[1].target), *weight.shape, prefix=prefix,
                                 shared=shared)


def _graphs(gm: GraphModule) -> Iterator[tuple[str, GraphModule]]:
    """(parameter-name prefix, graph module) for `gm` and the GraphModules nested in it."""
    for name, module in gm.named_modules():
        if isinstance(module, GraphModule):
            yield (f"{name}." if name else ""), module


def moe_nodes(gm: GraphModule, transposed: bool = False) -> Iterator[tuple[str, GraphModule, Node]]:
    """Every autodeploy::moe whose expert weights are plain, untied [E, out, in] parameters; with `transposed` also
    [E, in, out] ones the graph transposes for it alone (GPT-OSS's)."""
    names = _single_name_params(gm)
    for prefix, module in _graphs(gm):
        for node in list(module.graph.nodes):
            if is_op(node, MOE) and all(_expert_bank(module, node.args[i], names, transposed) for i in (3, 4)):
                yield prefix, module, node


def _expert_bank(module: GraphModule, node: Node, names: Counter, transposed: bool) -> bool:
    stored, is_transposed = stored_expert_weight(node)
    if is_transposed and not (transposed and len(node.users) == 1 and len(stored.users) == 1):
        return False
    return _plain_param(module, stored, names) is not None


def replace_params(module: GraphModule, anchor: Node, old: list[Node], owner_path: str,
                   params: dict[str, tuple[tuple, torch.dtype]]) -> dict[str, Node]:
    """Delete the parameters `old` reads, register meta placeholders `params` on `owner_path`, get_attr them."""
    fake_mode = detect_fake_mode([val(n) for n in anchor.all_input_nodes if val(n) is not None])
    for node in old:
        owner, _, attr = node.target.rpartition(".")
        delattr(module.get_submodule(owner), attr)
    owner = module.get_submodule(owner_path)
    nodes = {}
    for attr, (shape, dtype) in params.items():
        placeholder = torch.empty(shape, dtype=dtype, device="meta")
        owner.register_parameter(attr, nn.Parameter(placeholder, requires_grad=False))
        with module.graph.inserting_before(anchor):
            nodes[attr] = module.graph.get_attr(f"{owner_path}.{attr}")
        if fake_mode is not None:
            nodes[attr].meta["val"] = fake_mode.from_tensor(placeholder)
    return nodes


def swap_linear(site: LinearSite, scheme: LinearScheme, scale_dtype: torch.dtype) -> dict[str, str]:
    """Replace the site's linear with the scheme's op; returns graph parameter name -> param suffix."""
    if site.shared:
        raise QuantizationError(f"{site.path}: its weight is also read by another op (tied word embeddings), so it "
                                "cannot be replaced by a quantized one")
    node, module, weight = site.node, site.module, site.node.args[1]
    args = bind_args(node)
    owner_path, _, attr = weight.target.rpartition(".")
    suffix = attr.removeprefix("weight")  # a part of a fused weight (tensor parallelism): its params keep its suffix
    params = scheme.params(site.out_features, site.in_features, scale_dtype)
    named = replace_params(module, node, [weight], owner_path, {f"{k}{suffix}": p for k, p in params.items()})
    nodes = {k: named[f"{k}{suffix}"] for k in params}
    op, op_args, kwargs = scheme.linear_call(args["x"], nodes, args["bias"])
    with module.graph.inserting_before(node):
        new = module.graph.call_function(op, op_args, kwargs)
    inherit_meta(new, node, with_val=True)
    node.replace_all_uses_with(new)
    module.graph.erase_node(node)
    module.graph.erase_node(weight)
    return {f"{site.prefix}{owner_path}.{k}{suffix}": k for k in nodes}


def quantized_module_paths(gm: GraphModule) -> set[str]:
    """HF paths of the modules whose weights a quantization transform replaced (they hold a scale)."""
    return {hf_path(name) for name, _ in gm.named_parameters() if name.endswith(("weight_scale", ".scales"))}


# Linear parameter suffix -> the suffix an expert weight `w` gets (its quantized tensor keeps w's name).
EXPERT_SUFFIX = {"weight": "", "qweight": "", "weight_scale": "_scale", "scales": "_scales", "zeros": "_zeros",
                 "input_scale": "_input_scale"}


def expert_params(scheme: LinearScheme, experts: int, out_features: int, in_features: int,
                  scale_dtype: torch.dtype) -> dict[str, tuple[tuple, torch.dtype]]:
    """Param suffix -> ([E, ...] shape, dtype): a linear's params stacked over the experts."""
    return {EXPERT_SUFFIX[k]: ((experts, *shape), dtype)
            for k, (shape, dtype) in scheme.params(out_features, in_features, scale_dtype).items()}


def quantize_experts(scheme: LinearScheme, w: torch.Tensor, scale_dtype: torch.dtype,
                     combine=None) -> dict[str, torch.Tensor]:
    """[E, N, K] expert weights -> param suffix -> [E, ...] tensors (each expert row-wise as a linear, or in its
    own blocks; `combine`: as LinearScheme.quantize's, for a slice of K)."""
    e, n, k = w.shape
    if scheme.weight_block:  # blocks of each expert's own rows
        per_expert = [scheme.quantize(w[i], scale_dtype, combine) for i in range(e)]
        return {EXPERT_SUFFIX[name]: torch.stack([q[name] for q in per_expert]) for name in per_expert[0]}
    flat = scheme.quantize(w.reshape(e * n, k), scale_dtype, combine)
    return {EXPERT_SUFFIX[name]: t.reshape(e, n, *t.shape[1:]) for name, t in flat.items()}


def swap_moe(prefix: str, module: GraphModule, node: Node, scheme: LinearScheme,
             scale_dtype: torch.dtype) -> dict[str, tuple[tuple, dict[str, str]]]:
    """Replace an autodeploy::moe with fp8_moe / int_moe over quantized expert weights (in [E, N, K], also where
    the graph transposed stored [E, K, N] banks).

    Returns, per replaced weight (graph name), its [E, N, K] shape, {graph param name: param suffix} and whether
    the stored tensor is [E, K, N].
    """
    args = bind_args(node)
    quantized, loads = {}, {}
    for arg in ("w_gate_up", "w_down"):
        weight, transposed = stored_expert_weight(args[arg])
        owner_path, _, attr = weight.target.rpartition(".")
        shape = tuple(val(args[arg]).shape)
        params = expert_params(scheme, *shape, scale_dtype)
        nodes = replace_params(module, node, [weight], owner_path, {attr + s: p for s, p in params.items()})
        quantized[arg] = {s: nodes[attr + s] for s in params}
        loads[f"{prefix}{weight.target}"] = (shape, {f"{prefix}{owner_path}.{attr}{s}": s for s in params}, transposed)
    g, d = quantized["w_gate_up"], quantized["w_down"]
    common = (args["x"], args["topk_ids"], args["topk_weights"])
    kwargs = {"b_gate_up": args["b_gate_up"], "b_down": args["b_down"]}
    if scheme.kind == "fp8":
        op = torch.ops.autodeploy.fp8_moe.default
        op_args = (*common, g[""], g["_scale"], d[""], d["_scale"], args["activation"])
        if scheme.static_input:  # a checkpoint's static activation scales, one per expert
            kwargs.update(w_gate_up_input_scale=g["_input_scale"], w_down_input_scale=d["_input_scale"])
        if scheme.weight_block:
            kwargs["weight_block"] = scheme.weight_block
    else:
        op = torch.ops.autodeploy.int_moe.default
        op_args = (*common, g[""], g["_scales"], g.get("_zeros"), d[""], d["_scales"], d.get("_zeros"),
                   args["activation"], scheme.bits, scheme.group_size)
    with module.graph.inserting_before(node):
        new = module.graph.call_function(op, op_args, kwargs)
    inherit_meta(new, node, with_val=True)
    node.replace_all_uses_with(new)
    old_weights = [args["w_gate_up"], args["w_down"]]
    module.graph.erase_node(node)
    for weight in old_weights:
        stored = stored_expert_weight(weight)[0]
        for dead in dict.fromkeys((weight, stored)):  # the transpose, then what it read
            if not dead.users:
                module.graph.erase_node(dead)
    return loads
