"""select_backends: run each canonical op on the backend the recipe names (torch or triton).

A backend is a custom op with the canonical op's schema (kernels/triton_backends.py), so choosing
one swaps the node's target and nothing else. `auto` means Triton on CUDA, where the kernels are
compiled, and the torch reference elsewhere (on CPU Triton only interprets: correct, but slow).
Runs last in the fusion stage, so ops made by fusions (fused_add_rms_norm) get a backend too.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.fx import GraphModule

from autodeploy.errors import RecipeError
from autodeploy.graph_utils import graph_modules
from autodeploy.kernels.triton_backends import BACKENDS, pick_backend

from .registry import Stage, Transform, TransformConfig, TransformContext, register


@dataclass
class SelectBackendsConfig(TransformConfig):
    # canonical op -> torch | triton | auto; ops left out keep the torch reference.
    backends: dict[str, str] = field(default_factory=lambda: dict.fromkeys(BACKENDS, "auto"))


def resolve_backend(op: str, choice: str, device: torch.device) -> str:
    """The backend `choice` means for `op` on `device`; unknown names fail with the valid ones."""
    if op not in BACKENDS:
        raise RecipeError(f"select_backends: unknown op '{op}' (ops with backends: {', '.join(BACKENDS)})")
    return pick_backend(f"select_backends: op '{op}'", BACKENDS[op], choice, device)


@register
class SelectBackends(Transform):
    name = "select_backends"
    stage = Stage.FUSION
    config_cls = SelectBackendsConfig

    def apply(self, gm: GraphModule, ctx: TransformContext) -> dict[str, int]:
        chosen = {op: resolve_backend(op, choice, ctx.device) for op, choice in self.config.backends.items()}
        canonical = {BACKENDS[op]["torch"]: op for op in chosen}
        counts = {f"{op}_{backend}": 0 for op, backend in chosen.items()}
        for module in graph_modules(gm):
            for node in module.graph.nodes:
                op = canonical.get(node.target) if node.op == "call_function" else None
                if op is not None:
                    node.target = BACKENDS[op][chosen[op]]
                    counts[f"{op}_{chosen[op]}"] += 1
        return counts
