"""Tensor layouts the row-wise Triton kernels take."""

from __future__ import annotations

import torch


def as_rows(t: torch.Tensor, unit_columns: bool = True) -> torch.Tensor:
    """t as [rows, n] with unit stride along n (any positive stride without `unit_columns`: a kernel that takes
    a column stride): a view where possible, so slices of a wider tensor (e.g. the halves of a fused gate_up
    projection, or its alternating columns) are read in place with their strides."""
    rows = t.reshape(-1, t.shape[-1])
    in_place = rows.stride(-1) == 1 or (not unit_columns and rows.stride(-1) > 0)
    return rows if in_place else rows.contiguous()


def merged_stride(t: torch.Tensor, dims: int) -> int | None:
    """The stride of t's first `dims` dims walked in order as one (what a view merging them has), None where no
    view can merge them (e.g. [tokens, heads] of a slice of a fused qkv output)."""
    steps = [(size, stride) for size, stride in zip(t.shape[:dims], t.stride()[:dims]) if size != 1]
    for (_, outer), (size, inner) in zip(steps, steps[1:]):
        if outer != inner * size:
            return None
    return steps[-1][1] if steps else 0


def token_major_output(q: torch.Tensor, num_tokens: int, v_dim: int) -> torch.Tensor:
    """An attention output [1, n_heads, T, v_dim] stored token-major ([1, T, n_heads, v_dim] in memory): the
    model's next step, transpose(1, 2) then contiguous / reshape to [T, n_heads * v_dim], is then a view
    instead of a copy kernel per layer (at batch 1 both layouts coincide; at batch 64 the copy cost ~2.4 us)."""
    return q.new_empty(1, num_tokens, q.shape[1], v_dim).transpose(1, 2)
