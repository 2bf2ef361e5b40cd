"""Export `torch.tensor(<python number>)` as an op of the graph, not as a lifted constant.

Why: modeling code builds scalar tensors in its forward (GPT-Neo's attention mask value:
`torch.tensor(finfo.min, dtype=..., device=...)`). torch.export lifts such a tensor into a constant,
and exported on the meta device that constant has no data (load_weights then rejects the model).
The same value made by `torch.full((), value, ...)` is an `aten.full` node, computed on the device
the graph runs on. Only plain numbers with at most `dtype` / `device` are rerouted: anything else
(lists, tensors, `requires_grad`, ...) goes to the real `torch.tensor`.
For every torch version (non-strict export traces Python calls as they are made).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from . import ExportPatch, register_patch


def _is_number(data) -> bool:
    return isinstance(data, (bool, int, float))


@contextlib.contextmanager
def _scalars_as_full(model: nn.Module):
    original = torch.tensor

    def tensor(data, *args, **kwargs):
        if args or not _is_number(data) or not set(kwargs) <= {"dtype", "device"}:
            return original(data, *args, **kwargs)
        dtype = kwargs.get("dtype") or original(data).dtype  # the dtype torch.tensor would infer
        return torch.full((), data, dtype=dtype, device=kwargs.get("device"))

    torch.tensor = tensor
    try:
        yield
    finally:
        torch.tensor = original


register_patch(ExportPatch(
    name="scalar_tensor_as_full",
    why="a scalar built with torch.tensor in forward becomes a data-less constant when exporting on meta",
    applies=lambda: True,
    patch=_scalars_as_full,
))
