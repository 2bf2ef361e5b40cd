"""Which part of a checkpoint tensor a rank holds, and reading just that part.

The sharding transform records one `ShardSlice` per sharded parameter in the graph's meta
(`SHARDS_KEY`); weight loading reads the slice straight from the mmapped safetensors file
(`get_slice`), so no rank ever holds the unsharded tensor. A slice is a list of ranges along one
dim, concatenated: one range for a plain column/row split, several for a fused projection whose
parts (q/k/v, gate/up) are each split on their own. A slice without ranges is the whole tensor under
another name (a fused part's quantized tensors that every part reads whole, e.g. act-order's g_idx).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx import GraphModule

SHARDS_KEY = "autodeploy_shards"


@dataclass(frozen=True)
class ShardSlice:
    dim: int
    ranges: tuple[tuple[int, int], ...]  # [start, stop) along `dim`, in the order they are concatenated; () whole
    key: str | None = None  # the checkpoint tensor, when not the parameter's own name (a fused part)
    size: int | None = None  # the whole tensor's size along `dim` (scales a quantized layer's slices)

    @property
    def length(self) -> int:
        return sum(stop - start for start, stop in self.ranges)

    def local_shape(self, full_shape) -> tuple[int, ...]:
        shape = list(full_shape)
        shape[self.dim] = self.length
        return tuple(shape)

    def take(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's part of an already materialised tensor."""
        if not self.ranges:
            return full
        return torch.cat([full.narrow(self.dim, start, stop - start) for start, stop in self.ranges], self.dim)

    def read(self, handle, key: str) -> torch.Tensor:
        """This rank's part of checkpoint tensor `key`, read from a safetensors handle slice by slice."""
        if not self.ranges:
            return handle.get_tensor(key)
        view = handle.get_slice(key)
        ndim = len(view.get_shape())
        parts = []
        for start, stop in self.ranges:
            index = [slice(None)] * ndim
            index[self.dim] = slice(start, stop)
            parts.append(view[tuple(index)])
        return torch.cat(parts, self.dim)


def shards_of(gm: GraphModule) -> dict[str, ShardSlice]:
    """Checkpoint-style parameter name (no wrapper prefix) -> the slice this rank loads; empty when unsharded."""
    return gm.meta.get(SHARDS_KEY, {})


def checkpoint_name(name: str, shards: dict[str, ShardSlice]) -> str:
    """The checkpoint tensor parameter `name` is read from (a part of a fused tensor names the whole)."""
    shard = shards.get(name)
    return shard.key if shard is not None and shard.key else name
