"""Tensor layouts the row-wise Triton kernels take."""

from __future__ import annotations

import torch


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """t as [rows, n] with unit stride along n: a view where possible, so slices of a wider tensor
    (e.g. the halves of a fused gate_up projection) are read in place with their row stride."""
    rows = t.reshape(-1, t.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()
