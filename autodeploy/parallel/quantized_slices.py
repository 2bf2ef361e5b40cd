"""Slices of a pre-quantized checkpoint's tensors for a sharded linear (tensor parallelism).

The sharding stage records the slice of each full-precision weight [N, K] (rows: column-parallel,
columns: row-parallel). Online quantization reads exactly that slice and quantizes it. A checkpoint
that is already quantized stores other tensors per layer, laid out [N, ...] (compressed-tensors,
ModelOpt): the FP8 weight, packed int codes [N, K * bits / 32], group scales [N, K / group],
per-channel scales [N] or [N, 1], per-tensor scales. Each takes the weight's ranges scaled to its own
resolution along the split dim; a tensor with size 1 there (per-tensor, or per-row scales of a
row-parallel linear) is replicated. A boundary that falls inside a packed word or a group is a clear
error. GPTQ / AWQ store codes transposed ([K / 8, N]) and act-order indices refer to global groups:
they are refused for now.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Callable

from autodeploy.errors import QuantizationError

from .slices import ShardSlice

_UNSUPPORTED = (".qweight", ".qzeros", ".g_idx", ".weight_g_idx")  # transposed codes, global group indices


def quantized_slices(source_keys: list[str], shards: dict[str, ShardSlice],
                     full_shape: Callable[[str], tuple]) -> dict[str, ShardSlice]:
    """Checkpoint key -> this rank's slice, for the quantized tensors of every sharded linear."""
    found = {}
    for key in source_keys:
        weight = shards.get(key.rpartition(".")[0] + ".weight")
        if key in shards or weight is None:
            continue  # online quantization reads the sharded weight itself; unsharded layers read whole
        if key.endswith(_UNSUPPORTED) or weight.size is None:
            raise QuantizationError(f"{key}: this checkpoint layout cannot be sharded yet (GPTQ / AWQ codes, "
                                    "act-order or fused parts); run it with tensor_parallel_size 1")
        spec = _scaled(weight, tuple(full_shape(key)), key)
        if spec is not None:
            found[key] = spec
    return found


def _scaled(weight: ShardSlice, shape: tuple, key: str) -> ShardSlice | None:
    """`weight`'s ranges along its dim, scaled to `shape`'s resolution there; None when replicated."""
    if len(shape) <= weight.dim or shape[weight.dim] == 1:
        return None
    factor = Fraction(shape[weight.dim], weight.size)
    ranges = tuple((start * factor, stop * factor) for start, stop in weight.ranges)
    if any(bound.denominator != 1 for pair in ranges for bound in pair):
        raise QuantizationError(f"{key}: the shard boundaries {list(weight.ranges)} of {weight.size} fall inside its "
                                f"groups or packed words ({shape[weight.dim]} along dim {weight.dim})")
    return ShardSlice(weight.dim, tuple((int(a), int(b)) for a, b in ranges))
