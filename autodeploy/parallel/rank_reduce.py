"""Per-row statistics of a row-parallel weight, combined over the ranks that each hold a slice of K.

Online FP8 scales each output row of a weight by its amax (and the scale search picks, per row, the
factor with the least squared error). Over a rank's K slice those are the slice's statistics, not
the row's; combining them while the weight loads (max of the amaxes, sum of each candidate's error)
gives every rank TP 1's weight scales. Without a process group (one rank's graph built alone, as
`optimize -tp` does) each rank keeps its slice's statistics.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist

from autodeploy.kernels.collectives import world_size

# combine(per-row statistic, "max" | "sum") -> the statistic over every rank's slice of the rows
RowCombine = Callable[[torch.Tensor, str], torch.Tensor]
_OPS = {"max": dist.ReduceOp.MAX, "sum": dist.ReduceOp.SUM}


def combine_over_ranks(stat: torch.Tensor, op: str) -> torch.Tensor:
    """`stat` reduced over the default process group (every rank calls this, in the same order)."""
    if world_size() == 1:
        return stat
    out = stat.contiguous().clone()
    dist.all_reduce(out, op=_OPS[op])
    return out
