"""Skinny linears on the GPU, Llama-3.1-8B shapes (bf16): cuBLAS (F.linear) vs the Triton skinny kernel
over a sweep of its knobs, per row count. Device time inside a CUDA graph (triton.testing.do_bench_cudagraph)
and the bandwidth that time means (weight bytes / time).

Each timed call walks a pool of distinct weight copies (> 2x the L2 cache together), as the model's
layers do: timing one matrix over and over would serve the smaller ones (o: 33.5 MB) from L2.
Usage: python3 benchmarks/linear_bench.py [ROWS ...]   (default 1 16 32 64)"""

import itertools
import sys

import torch
import torch.nn.functional as F
import triton
from triton.runtime.errors import OutOfResources

from autodeploy.kernels.triton_linear import BLOCK_K, BLOCK_N, NUM_STAGES, NUM_WARPS, skinny_linear

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
POOL_BYTES = 160 * 2**20
DEFAULT = (BLOCK_N, BLOCK_K, NUM_WARPS, NUM_STAGES)


def knobs(rows: int) -> list[tuple[int, int, int, int]]:
    """(block_n, block_k, warps, stages) to try: wide K tiles for a few rows, narrower as x's tile grows."""
    if rows <= 16:
        return sorted({DEFAULT, *itertools.product((32, 64), (256, 512), (4,), (4, 5))})
    return sorted({DEFAULT, *itertools.product((32, 64, 128), (128, 256), (4, 8), (3, 4))})


def device_us(fn, calls: int) -> float:
    return triton.testing.do_bench_cudagraph(fn, rep=30) * 1e3 / calls


def main(rows_list: list[int]) -> None:
    torch.manual_seed(0)
    for rows in rows_list:
        print(f"\nrows {rows}: us per call (GB/s); best Triton knobs block_n/block_k/warps/stages")
        per_layer = {"cublas": 0.0, "triton": 0.0, "default": 0.0}
        for name, (n, k) in SHAPES.items():
            pool = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5
                    for _ in range(-(-POOL_BYTES // (n * k * 2)))]
            x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
            gbs = lambda us: n * k * 2 / us / 1e3  # noqa: E731
            cublas = device_us(lambda: [F.linear(x, w) for w in pool], len(pool))
            ref = F.linear(x, pool[0]).float()
            results = []
            for bn, bk, warps, stages in knobs(rows):
                run = lambda: [skinny_linear(x, w, None, bn, bk, warps, stages) for w in pool]  # noqa: E731
                try:
                    err = ((run()[0].float() - ref).norm() / ref.norm()).item()
                except OutOfResources:
                    continue
                if err > 1e-2:
                    print(f"  {name} {bn}/{bk}/{warps}/{stages}: WRONG rel err {err:.1e}")
                    continue
                results.append((device_us(run, len(pool)), bn, bk, warps, stages))
            results.sort()
            best = results[0]
            default = next((r[0] for r in results if r[1:] == DEFAULT), float("nan"))
            per_layer["cublas"] += cublas
            per_layer["triton"] += best[0]
            per_layer["default"] += default
            top3 = ", ".join(f"{r[0]:.1f} {r[1]}/{r[2]}/{r[3]}/{r[4]}" for r in results[:3])
            print(f"  {name:8s} {n}x{k}: cuBLAS {cublas:7.1f} ({gbs(cublas):5.0f})  Triton best {best[0]:7.1f} "
                  f"({gbs(best[0]):5.0f}) [{top3}]  default knobs {default:.1f}")
        print(f"  per layer: cuBLAS {per_layer['cublas']:.1f} us, Triton best {per_layer['triton']:.1f} us, "
              f"Triton default knobs {per_layer['default']:.1f} us")


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [1, 16, 32, 64])
