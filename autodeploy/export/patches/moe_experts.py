"""Export transformers-5 routed experts as one `torch.ops.autodeploy.moe` call.

Why: every experts implementation HF ships is wrong for export. The eager one loops over the experts
that received tokens (data-dependent control flow: export fails); `grouped_mm` picks its code path
from the device it is traced on (meta) and then calls `histc` on integer tensors, which has no CPU
kernel; `batched_mm` exports but gathers a full weight matrix per token. transformers 5 dispatches
the experts forward through a registry (`ALL_EXPERTS_FUNCTIONS`, selected by
`config._experts_implementation`), so the patch registers an "autodeploy" implementation that
calls the canonical op with the module's own fused weights, and selects it for the duration of the
export. Layouts the op cannot express (see patterns.moe.experts_layout) fall back to `batched_mm`,
which `match_moe` can still find by module boundary.

For transformers >= 5.0 (the experts-implementation registry); a no-op where it does not exist.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from autodeploy.patterns.moe import ExpertsLayout, experts_layout, experts_modules

from . import ExportPatch, register_patch

IMPLEMENTATION = "autodeploy"


def _registry():
    try:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    except ImportError:
        return None
    return ALL_EXPERTS_FUNCTIONS


def _weight(module: nn.Module, name: str, layout: ExpertsLayout) -> torch.Tensor:
    w = getattr(module, name)
    return w.transpose(1, 2) if layout.transposed else w


def autodeploy_experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """The experts forward as one canonical op (falls back to HF's batched_mm for odd layouts)."""
    from transformers.integrations.moe import batched_mm_experts_forward

    layout = experts_layout(self)
    if not isinstance(layout, ExpertsLayout):
        return batched_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    return torch.ops.autodeploy.moe(
        hidden_states,
        top_k_index,
        top_k_weights.to(hidden_states.dtype),
        _weight(self, "gate_up_proj", layout),
        _weight(self, "down_proj", layout),
        layout.activation,
        self.gate_up_proj_bias if layout.has_bias else None,
        self.down_proj_bias if layout.has_bias else None,
    )


@contextlib.contextmanager
def _select_autodeploy_experts(model: nn.Module):
    registry = _registry()
    configs = {id(m.config): m.config for m in experts_modules(model).values() if getattr(m, "config", None)}
    saved = {key: cfg._experts_implementation for key, cfg in configs.items()}
    registry.register(IMPLEMENTATION, autodeploy_experts_forward)
    for module in experts_modules(model).values():
        experts_layout(module)  # decided now, outside the trace (a custom gate is evaluated on real tensors)
    try:
        for cfg in configs.values():
            cfg._experts_implementation = IMPLEMENTATION
        yield
    finally:
        for key, cfg in configs.items():
            cfg._experts_implementation = saved[key]


register_patch(
    ExportPatch(
        name="moe_experts_as_canonical_op",
        why="HF experts implementations loop over experts (data-dependent) or pick device-specific kernels",
        applies=lambda: _registry() is not None,
        patch=_select_autodeploy_experts,
    )
)
