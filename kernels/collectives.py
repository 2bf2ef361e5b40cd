"""`autodeploy::all_reduce` and `autodeploy::all_gather`: the collectives tensor-parallel graphs hold.

The sharding transform puts them where a rank's partial results must be combined (after a
row-parallel linear, after expert-parallel experts, after a vocab-parallel embedding) or joined (the
logits of a vocab-parallel LM head). They act on torch.distributed's default group, so one graph
serves gloo on CPUs and NCCL on GPUs (where CUDA graphs capture them). Without an initialised group,
or with a group of one, all_reduce is the identity, so a sharded graph of world size 1 and the
plain graph compute the same thing.
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


@torch.library.custom_op("autodeploy::all_gather", mutates_args=(), schema="(Tensor x, int dim, int world) -> Tensor")
def all_gather(x: torch.Tensor, dim: int, world: int) -> torch.Tensor:
    """Every rank's `x` concatenated along `dim`, rank order (a vocab-parallel LM head's logits).

    `world` is in the schema so shapes are known without a process group (the fake impl)."""
    if world_size() != world:
        raise RuntimeError(f"all_gather over {world} ranks, but the process group has {world_size()}")
    if world == 1:
        return x.clone()
    rows = x.movedim(dim, 0).contiguous()  # gloo gathers along dim 0 only
    out = rows.new_empty((world * rows.shape[0], *rows.shape[1:]))
    # torch 2.13 renames all_gather_into_tensor (a FutureWarning there); torch 2.11 has only the old name
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, rows)
    return out.movedim(0, dim).contiguous()


@all_gather.register_fake
def _(x, dim, world):
    shape = list(x.shape)
    shape[dim] *= world
    return x.new_empty(shape)
