"""Split-K for the skinny quantized dots: several programs share one output tile's K, in one kernel.

A decode-batch linear with few output tiles (N = 4096 makes 32-64 of them) leaves most of an H200's 132 SMs
idle, and each program's time follows its number of K steps. So K is split over SPLIT_K programs (grid axis 2):
each stores its float32 partial, counts its arrival with an atomic, and the tile's last program to arrive adds
the partials in split order and stores y: the same y every call, whichever finishes last, and no second kernel.
The arrival counters zero themselves (the last program resets its tile's), so CUDA graphs replay them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_SPLIT_COUNTERS: dict[torch.device, torch.Tensor] = {}
SPLIT_COUNTER_TILES = 4096


@triton.jit
def k_range(K, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    """[start, end) of this program's share of K: whole K tiles, the last split taking what is left."""
    k_span = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
    k_start = tl.program_id(2) * k_span
    return k_start, tl.minimum(K, k_start + k_span)


@triton.jit
def sum_splits(acc, part_ptr, count_ptr, offs_m, offs_n, mask, M, N, SPLIT_K: tl.constexpr):
    """Store this program's partial acc [ROWS, N-tile]; returns (the sum of the tile's partials in split order,
    a [ROWS] mask that is true where this program arrived last and so holds it: AND it into the store's)."""
    tile = tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
    parts = part_ptr + offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
    tl.store(parts + tl.program_id(2) * M * N, acc, mask=mask)
    tl.debug_barrier()  # all of this program's partial is written before its arrival counts
    arrived = tl.atomic_add(count_ptr + tile, 1)  # acq_rel: the earlier arrivals' partials are visible
    last = (offs_m * 0 + arrived) == SPLIT_K - 1  # as a row vector: masks take it on every Triton (interpreter too)
    total = tl.load(parts, mask=mask & last[:, None], other=0.0, cache_modifier=".cg")
    for other in tl.static_range(1, SPLIT_K):
        total += tl.load(parts + other * M * N, mask=mask & last[:, None], other=0.0, cache_modifier=".cg")
    if arrived == SPLIT_K - 1:
        tl.store(count_ptr + tile, 0)  # zero again for the next call (and CUDA graph replay)
    return total, last


def split_counters(device: torch.device) -> torch.Tensor | None:
    """The device's arrival counters of split-K tiles (zero between calls: the last split of a tile resets its
    own), made outside any CUDA graph capture (a buffer made in one would live in the graph's pool); None
    when the first call is being captured (it then runs unsplit)."""
    if device not in _SPLIT_COUNTERS:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        _SPLIT_COUNTERS[device] = torch.zeros(SPLIT_COUNTER_TILES, dtype=torch.int32, device=device)
    return _SPLIT_COUNTERS[device]


def split_launch(split_k: int, tiles: int, k_steps: int, rows: int, n: int, device: torch.device) -> dict:
    """The SPLIT_K / part_ptr / count_ptr launch keywords for `split_k` splits (at most one per K step; 1 when the
    tiles outnumber the counters or none exist yet)."""
    split_k = min(split_k, k_steps)
    counts = split_counters(device) if split_k > 1 else None
    if counts is None or tiles > counts.numel():
        return {"SPLIT_K": 1, "part_ptr": None, "count_ptr": None}
    return {"SPLIT_K": split_k, "part_ptr": torch.empty(split_k, rows, n, dtype=torch.float32, device=device),
            "count_ptr": counts}


def splits_for(tiles: int, k_steps: int, device: torch.device, programs_per_sm: int, min_steps: int,
               max_splits: int) -> int:
    """Splits of K per output tile: until there are `programs_per_sm` programs per SM (8 SMs off CUDA, where the
    interpreter runs), each keeping at least `min_steps` K steps, at most `max_splits`."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8
    return max(1, min(programs_per_sm * sms // tiles, k_steps // min_steps, max_splits))
