"""Online FP8 of a row-parallel weight: each rank's slice of K gets the whole row's scales.

Two ranks are two threads here, their `combine` an in-memory all-reduce (the same order on both),
so the quantizers run exactly as on a rank; the reference is the whole weight quantized at once.
The gloo run over real ranks: tests/test_tensor_parallel.py (online fp8, slow).
"""

import threading

import pytest
import torch

from autodeploy.kernels.quant_format import quantize_fp8
from autodeploy.quantization.scale_search import quantize_fp8_search


def _over_two_ranks(quantize, w: torch.Tensor):
    """quantize(slice, combine) on both halves of w's columns at once, statistics combined between them."""
    barrier, posted, results = threading.Barrier(2, timeout=30), [None, None], [None, None]

    def combine(rank: int, stat: torch.Tensor, op: str) -> torch.Tensor:
        posted[rank] = stat
        barrier.wait()
        both = torch.stack(posted)
        barrier.wait()  # both read before either posts its next statistic
        return both.amax(0) if op == "max" else both.sum(0)

    def run(rank: int) -> None:
        half = w.shape[1] // 2
        results[rank] = quantize(w[:, rank * half:(rank + 1) * half], lambda stat, op: combine(rank, stat, op))

    threads = [threading.Thread(target=run, args=(rank,)) for rank in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return results


@pytest.mark.parametrize("search", [False, True], ids=["rtn", "scale_search"])
def test_row_parallel_halves_get_the_whole_rows_scales(search):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(600, 1024, generator=g) * torch.rand(600, 1, generator=g)  # two row chunks of the search per half
    w[:, 700] *= 9  # the largest entry of every row lies in the second half only
    if search:
        whole, scale = quantize_fp8_search(w)
        ranks = _over_two_ranks(lambda part, combine: quantize_fp8_search(part, combine=combine), w)
        alone = quantize_fp8_search(w[:, :512])[1]
    else:
        whole, scale = quantize_fp8(w, per_channel=True)
        ranks = _over_two_ranks(lambda part, combine: quantize_fp8(part, True, combine), w)
        alone = quantize_fp8(w[:, :512], per_channel=True)[1]
    for rank, (codes, local_scale) in enumerate(ranks):
        assert torch.equal(local_scale, scale), rank
        assert torch.equal(codes.view(torch.uint8), whole[:, rank * 512:(rank + 1) * 512].view(torch.uint8)), rank
    assert not torch.equal(alone, scale)  # without combining, the first half's scales are its own
