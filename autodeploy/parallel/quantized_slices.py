"""Slices of a pre-quantized checkpoint's tensors for a sharded linear (tensor parallelism).

The sharding stage records the slice of each full-precision weight [N, K] (rows: column-parallel,
columns: row-parallel). Online quantization reads exactly that slice and quantizes it. A checkpoint
that is already quantized stores other tensors per layer. Most are laid out [N, ...]
(compressed-tensors, ModelOpt): the FP8 weight, packed int codes [N, K * bits / 32], group scales
[N, K / group], per-channel scales [N] or [N, 1], per-tensor scales. GPTQ / AWQ store theirs
transposed ([K / 8, N] codes, [G, N] scales and zeros) and act-order's g_idx [K]; which of their dims
follows N or K is said by `gptq_awq.stored_dim`. Each tensor takes the weight's ranges scaled to its
own resolution along the matching dim; a tensor with size 1 there (per-tensor, or per-row scales of a
row-parallel linear), or none (act-order group tensors along K: g_idx indexes the whole row's groups),
is replicated. A boundary that falls inside a packed word or a group is a clear error. A part of a
fused projection (Phi-3's qkv_proj, split per part before sharding) reads its layer's tensors under
its own weight's name (`<layer>.weight_rows_a_b.qweight`: each part its own slice of one checkpoint
tensor); its slices name the fused tensor they come from.
"""

from __future__ import annotations

from dataclasses import replace
from fractions import Fraction
from math import lcm
from typing import Callable

from autodeploy.errors import QuantizationError
from autodeploy.kernels.quant_format import groups_of
from autodeploy.quantization.gptq_awq import STORED_NAMES, stored_dim
from autodeploy.quantization.schemes import LinearScheme

from .slices import ShardSlice

_UNSUPPORTED = (".weight_g_idx",)  # compressed-tensors act-order: not sharded yet


def check_whole_blocks(scheme: LinearScheme, weight: ShardSlice | None, path: str) -> None:
    """A slice of FP8 block-scaled weights must cut them on block boundaries (the weight's short last block may end
    it), so that each rank's blocks, and its slices of the block scales, are TP 1's."""
    block = scheme.weight_block
    if not block or weight is None:
        return
    if any(start % block or (stop % block and stop != weight.size) for start, stop in weight.ranges):
        raise QuantizationError(f"{path}: this rank's slice {list(weight.ranges)} cuts FP8 weight blocks of {block}; "
                                "use a tensor_parallel_size whose slices hold whole blocks")


def sharded_scheme(scheme: LinearScheme, weight: ShardSlice | None, path: str) -> LinearScheme:
    """The scheme of this rank's slice of a checkpoint-quantized linear, checked before anything is read.

    A row-parallel slice must start and end on whole int32 words of codes and, without act-order, on
    whole groups; with act-order its columns keep indexing the whole row's groups (`scheme.groups`).
    FP8 block scales: whole blocks (check_whole_blocks)."""
    check_whole_blocks(scheme, weight, path)
    if weight is None or weight.dim != 1 or scheme.kind != "int":
        return scheme
    per_word = 32 // scheme.bits
    what = f"int32 words of {per_word} codes"
    unit = per_word
    if not scheme.act_order and scheme.group_size != -1:
        unit, what = lcm(per_word, scheme.group_size), f"{what} or groups of {scheme.group_size} columns"
    if any(bound % unit for pair in weight.ranges for bound in pair):
        raise QuantizationError(f"{path}: this rank's input columns {list(weight.ranges)} of {weight.size} split the "
                                f"checkpoint's {what}; use a tensor_parallel_size whose slices hold whole ones")
    if scheme.act_order:
        return replace(scheme, groups=groups_of(weight.size, scheme.group_size))
    return scheme


def quantized_slices(source_keys: list[str], shards: dict[str, ShardSlice],
                     full_shape: Callable[[str], tuple]) -> dict[str, ShardSlice]:
    """Checkpoint key -> this rank's slice, for the quantized tensors of every sharded linear."""
    act_order = {key.rpartition(".")[0] for key in source_keys if key.endswith(".g_idx")}
    found = {}
    for key in source_keys:
        layer, _, name = key.rpartition(".")
        weight = shards.get(layer + ".weight", shards.get(layer))  # a fused part's layer is its weight's name
        if key in shards or weight is None:
            continue  # online quantization reads the sharded weight itself; unsharded layers read whole
        if key.endswith(_UNSUPPORTED):
            raise QuantizationError(f"{key}: compressed-tensors act-order cannot be sharded yet; run it with "
                                    "tensor_parallel_size 1")
        stored = key if weight.key is None else f"{weight.key.rpartition('.')[0]}.{name}"
        dim = stored_dim(name, weight.dim, layer in act_order) if name in STORED_NAMES else weight.dim
        spec = None if dim is None else _scaled(weight, dim, tuple(full_shape(stored)), key)
        if weight.key is not None:  # read under the fused tensor's name, whole where it has no slice
            spec = ShardSlice(spec.dim if spec else 0, spec.ranges if spec else (), stored)
        if spec is not None:
            found[key] = spec
    return found


def _scaled(weight: ShardSlice, dim: int, shape: tuple, key: str) -> ShardSlice | None:
    """`weight`'s ranges, scaled to `shape`'s resolution along its `dim`; None when replicated."""
    if len(shape) <= dim or shape[dim] == 1:
        return None
    factor = Fraction(shape[dim], weight.size)
    ranges = tuple((start * factor, stop * factor) for start, stop in weight.ranges)
    if any(bound.denominator != 1 for pair in ranges for bound in pair):
        raise QuantizationError(f"{key}: the shard boundaries {list(weight.ranges)} of {weight.size} fall inside its "
                                f"groups or packed words ({shape[dim]} along dim {dim})")
    return ShardSlice(dim, tuple((int(a), int(b)) for a, b in ranges))
