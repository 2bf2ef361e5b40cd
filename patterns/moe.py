"""Recognise HF (transformers 5) routed-experts modules and the graph regions traced from them.

transformers 5 stores a MoE block's routed experts as one module with fused 3D parameters
(`gate_up_proj [E, 2I, H]`, `down_proj [E, H, I]`, optionally transposed and with biases) whose
forward is picked at run time from an "experts implementation" (eager loop, batched_mm, grouped_mm,
...). Its call signature is always `experts(hidden_states[T, H], top_k_index[T, K],
top_k_weights[T, K]) -> [T, H]`, whatever the implementation. So instead of matching each
implementation's op soup, the matcher takes the module boundary that export records in every node's
`nn_module_stack`: the region traced from one experts module, its three tensor inputs (told apart by
dtype and shape) and its one output. The router (softmax / sigmoid / top-k / group limits) is outside
that module and stays ordinary graph ops.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import nn
from torch.fx import GraphModule, Node

from autodeploy.graph_utils import is_op

from .helpers import val

# HF `hidden_act` values -> the activation names of autodeploy::gated_act / autodeploy::moe.
HF_ACTIVATIONS = {
    "silu": "silu",
    "swish": "silu",
    "gelu": "gelu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "relu": "relu",
}


@dataclass(frozen=True)
class ExpertsLayout:
    """How one experts module's parameters map onto autodeploy::moe's canonical layout."""

    activation: str
    transposed: bool  # weights stored [E, in, out] instead of [E, out, in]
    has_bias: bool


def is_experts_module(module: nn.Module) -> bool:
    """A transformers-5 fused experts module (decorated with `use_experts_implementation`)."""
    down = getattr(module, "down_proj", None)
    return hasattr(module, "has_gate") and hasattr(module, "is_transposed") and isinstance(down, torch.Tensor) \
        and down.dim() == 3


_LAYOUTS: "weakref.WeakKeyDictionary[nn.Module, ExpertsLayout | str]" = weakref.WeakKeyDictionary()


def experts_layout(module: nn.Module) -> ExpertsLayout | str:
    """The module's layout, or why autodeploy::moe cannot express it (a one-line reason). Remembered per module:
    a custom gate is evaluated once, before export traces the forward that asks again."""
    if module not in _LAYOUTS:
        _LAYOUTS[module] = _layout(module)
    return _LAYOUTS[module]


def _layout(module: nn.Module) -> ExpertsLayout | str:
    from transformers.integrations.moe import _default_apply_gate

    if not getattr(module, "has_gate", False):
        return "experts without a gate projection"
    if getattr(module, "has_post_expert_norm", False):
        return "post-expert norm"
    if getattr(type(module), "_apply_gate", _default_apply_gate) is not _default_apply_gate:
        activation = custom_gate_activation(module)
        if activation is None:
            return f"custom gating in {type(module).__name__}._apply_gate"
        return ExpertsLayout(activation, bool(module.is_transposed), bool(module.has_bias))
    if not getattr(module, "is_concatenated", True):
        return "interleaved gate/up layout"
    hidden_act = getattr(getattr(module, "config", None), "hidden_act", None)
    if hidden_act not in HF_ACTIVATIONS:
        return f"activation {hidden_act!r}"
    return ExpertsLayout(HF_ACTIVATIONS[hidden_act], bool(module.is_transposed), bool(module.has_bias))


def custom_gate_activation(module: nn.Module) -> str | None:
    """The canonical gated activation a module's own `_apply_gate` computes, found by evaluating it (GPT-OSS's
    clamped SwiGLU on alternating gate / up columns is `swigluoai`), or None. The probe's values reach past
    the clamps such gates apply; the layout (`is_concatenated`) must agree with the activation's."""
    from autodeploy.kernels.gated_act import GATED_ACTIVATIONS, INTERLEAVED, gated, split_gate_up

    probe = torch.randn(4, 32, generator=torch.Generator().manual_seed(0)) * 6
    try:
        with torch.no_grad():
            got = module._apply_gate(probe)
    except Exception:
        return None
    concatenated = getattr(module, "is_concatenated", True)
    for name in GATED_ACTIVATIONS:
        if (name in INTERLEAVED) == concatenated:
            continue
        want = gated(*split_gate_up(probe, name), name)
        if got.shape == want.shape and torch.allclose(got, want, rtol=1e-5, atol=1e-5):
            return name
    return None


def stored_expert_weight(node: Node) -> tuple[Node, bool]:
    """(the get_attr an autodeploy::moe weight argument reads, whether the graph transposes it from [E, in, out])."""
    if is_op(node, torch.ops.aten.transpose.int) and sorted(node.args[1:]) == [1, 2]:
        return node.args[0], True
    return node, False


def experts_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Module path -> experts module, for every routed-experts module in `model`."""
    return {name: m for name, m in model.named_modules() if is_experts_module(m)}


@dataclass
class ExpertsRegion:
    """The nodes traced from one experts module, with its inputs and output identified."""

    nodes: list[Node]  # in graph order
    hidden: Node  # [T, H] float
    topk_ids: Node  # [T, K] integer
    topk_weights: Node  # [T, K] float
    output: Node  # the one region node used outside the region


def _in_module(node: Node, path: str) -> bool:
    stack = node.meta.get("nn_module_stack") or {}
    return any(entry[0] == path for entry in stack.values())


def module_nodes(graph_module: GraphModule, path: str) -> list[Node]:
    """The call_function nodes traced from the module at `path` (as in nn_module_stack), in order."""
    return [n for n in graph_module.graph.nodes if n.op == "call_function" and _in_module(n, path)]


def find_experts_region(graph_module: GraphModule, path: str) -> ExpertsRegion | None:
    """The region of `graph_module` traced from the module at `path` (as in nn_module_stack).

    None when there is no such region, or it does not have the experts call signature (one [T, H]
    float input, one [T, K] integer input, one [T, K] float input, one output).
    """
    nodes = module_nodes(graph_module, path)
    if not nodes:
        return None
    inside = set(nodes)
    inputs = {a for n in nodes for a in n.all_input_nodes if a not in inside and isinstance(val(a), torch.Tensor)}
    inputs = {a for a in inputs if a.op != "get_attr"}  # the expert weights come from the module itself
    # Symbolic sizes computed inside the region may be reused outside it: those are not outputs.
    outputs = [n for n in nodes if isinstance(val(n), torch.Tensor) and any(u not in inside for u in n.users)]
    if len(outputs) != 1 or len(inputs) != 3:
        return None
    ids = [a for a in inputs if not val(a).is_floating_point()]
    if len(ids) != 1:
        return None
    weights = [a for a in inputs - set(ids) if val(a).shape == val(ids[0]).shape]
    hidden = list(inputs - set(ids) - set(weights[:1]))
    if len(weights) < 1 or len(hidden) != 1:
        return None
    return ExpertsRegion(nodes=nodes, hidden=hidden[0], topk_ids=ids[0], topk_weights=weights[0], output=outputs[0])


def has_moe_op(nodes: list[Node]) -> bool:
    return any(is_op(n, torch.ops.autodeploy.moe) for n in nodes)
