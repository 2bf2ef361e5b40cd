"""Every patch HF code needs to export lives here, each with the versions it is for.

A patch is a context manager factory `patch(model) -> ContextManager`; `applies()` says whether the
installed torch/transformers versions need it. Patches are applied only around `torch.export`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, ContextManager

from torch import nn


@dataclass(frozen=True)
class ExportPatch:
    name: str
    why: str
    applies: Callable[[], bool]
    patch: Callable[[nn.Module], ContextManager]


PATCHES: list[ExportPatch] = []


def register_patch(patch: ExportPatch) -> ExportPatch:
    PATCHES.append(patch)
    return patch


@contextlib.contextmanager
def apply_export_patches(model: nn.Module):
    with contextlib.ExitStack() as stack:
        for p in PATCHES:
            if p.applies():
                stack.enter_context(p.patch(model))
        yield


from . import moe_experts  # noqa: E402,F401  (registers the MoE experts patch)
from . import list_index  # noqa: E402,F401  (registers the list-index patch)
from . import ssm_functions  # noqa: E402,F401  (HF's scan / delta-rule / conv functions -> canonical ops)
from . import scalar_tensor  # noqa: E402,F401  (torch.tensor(<number>) in forward -> aten.full)
