"""`autodeploy::all_reduce`: the collective tensor-parallel graphs hold.

The sharding transform puts them where a rank's partial results must be combined (after a
row-parallel linear, after expert-parallel experts). It acts on torch.distributed's default group,
so one graph serves gloo on CPUs and NCCL on GPUs (where CUDA graphs capture them). Without an
initialised group, or with a group of one, it is the identity, so a sharded graph of world size
1 and the plain graph compute the same thing.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def world_size() -> int:
    """Ranks of the default group, 1 when torch.distributed is not initialised."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


@torch.library.custom_op("autodeploy::all_reduce", mutates_args=(), schema="(Tensor x) -> Tensor")
def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum of `x` over every rank (a fresh tensor; `x` is left alone)."""
    out = x.clone()
    if world_size() > 1:
        dist.all_reduce(out)
    return out


@all_reduce.register_fake
def _(x):
    return torch.empty_like(x)
