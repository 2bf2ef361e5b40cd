"""Index with slices where HF indexes with short int lists (Falcon's `fused_qkv[..., [-2], :]`).

Why: a Python list used as an index becomes a constant tensor on the indexed tensor's device. We
export on the meta device, where that constant has no data, so the graph would index with garbage
after loading. A list of ints in arithmetic progression (same sign) selects exactly what a slice
selects, keeping the dimension, and a slice creates no constant.

For every torch/transformers version: the issue is the meta-device export itself.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from . import ExportPatch, register_patch


def _as_slice(index):
    """The equivalent slice for a list of ints in arithmetic progression, else the index unchanged."""
    if not (isinstance(index, list) and index and all(type(i) is int for i in index)):
        return index
    if not (all(i >= 0 for i in index) or all(i < 0 for i in index)):
        return index
    step = index[1] - index[0] if len(index) > 1 else 1
    if step <= 0 or any(b - a != step for a, b in zip(index, index[1:])):
        return index
    stop = index[-1] + 1
    return slice(index[0], None if stop == 0 else stop, step)


@contextlib.contextmanager
def _slice_list_indices(model: nn.Module):
    original = torch.Tensor.__getitem__

    def getitem(self, index):
        if isinstance(index, tuple):
            index = tuple(_as_slice(i) for i in index)
        else:
            index = _as_slice(index)
        return original(self, index)

    torch.Tensor.__getitem__ = getitem
    try:
        yield
    finally:
        torch.Tensor.__getitem__ = original


register_patch(
    ExportPatch(
        name="list_index_as_slice",
        why="list indices become data-less constant tensors when exporting on the meta device",
        applies=lambda: True,
        patch=_slice_list_indices,
    )
)
