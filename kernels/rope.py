"""`autodeploy::rope`: rotary position embedding applied to one tensor (q or k); `rope_pair`: to q and k
with the same cos/sin at once (`fuse_rope_pairs`: one kernel launch per layer instead of two).

cos/sin are tensors computed by the graph (HF's rotary embedding module, whatever its scaling
variant: default, llama3, yarn, longrope, ...), already broadcastable against x; the op only does
the rotation, so every RoPE variant reduces to the same kernel.
"""

from __future__ import annotations

import torch

SCHEMA = "(Tensor x, Tensor cos, Tensor sin, bool interleaved=False) -> Tensor"


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Llama / NeoX: (x1, x2) -> (-x2, x1) on the two halves of the last dim."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotate_every_two(x: torch.Tensor) -> torch.Tensor:
    """GPT-J / Cohere: each even/odd pair (a, b) -> (-b, a)."""
    return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)


@torch.library.custom_op("autodeploy::rope", mutates_args=(), schema=SCHEMA)
def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    """Reference: x * cos + rotate(x) * sin, in the promoted dtype of x and cos, cast to x's dtype.

    With interleaved=False cos/sin are HF's `cat((freqs, freqs))` layout; with interleaved=True
    they are `repeat_interleave(freqs, 2)` (GPT-J, Cohere), matching the pairwise rotation.
    """
    rotated = rotate_every_two(x) if interleaved else rotate_half(x)
    return (x * cos + rotated * sin).to(x.dtype)


@rope.register_fake
def _(x, cos, sin, interleaved=False):
    return torch.empty_like(x)


PAIR_SCHEMA = "(Tensor q, Tensor k, Tensor cos, Tensor sin, bool interleaved=False) -> (Tensor, Tensor)"


@torch.library.custom_op("autodeploy::rope_pair", mutates_args=(), schema=PAIR_SCHEMA)
def rope_pair(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
              interleaved: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: rope(q) and rope(k), each exactly as `rope`."""
    return rope(q, cos, sin, interleaved), rope(k, cos, sin, interleaved)


@rope_pair.register_fake
def _(q, k, cos, sin, interleaved=False):
    return torch.empty_like(q), torch.empty_like(k)
