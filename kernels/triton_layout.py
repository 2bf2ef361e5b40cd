"""Tensor layouts the row-wise Triton kernels take."""

from __future__ import annotations

import torch


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """t as [rows, n] with unit stride along n: a view where possible, so slices of a wider tensor
    (e.g. the halves of a fused gate_up projection) are read in place with their row stride."""
    rows = t.reshape(-1, t.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def token_major_output(q: torch.Tensor, num_tokens: int, v_dim: int) -> torch.Tensor:
    """An attention output [1, n_heads, T, v_dim] stored token-major ([1, T, n_heads, v_dim] in memory): the
    model's next step, transpose(1, 2) then contiguous / reshape to [T, n_heads * v_dim], is then a view
    instead of a copy kernel per layer (at batch 1 both layouts coincide; at batch 64 the copy cost ~2.4 us)."""
    return q.new_empty(1, num_tokens, q.shape[1], v_dim).transpose(1, 2)
