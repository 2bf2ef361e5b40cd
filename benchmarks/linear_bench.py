"""Skinny linears on the GPU, Llama-3.1-8B shapes (bf16): cuBLAS (F.linear) vs the Triton skinny kernel
over a sweep of its knobs. Device time inside a CUDA graph (triton.testing.do_bench_cudagraph), and
the bandwidth that time means (weight bytes / time). Usage: python3 benchmarks/linear_bench.py"""

import itertools

import torch
import torch.nn.functional as F
import triton
from triton.runtime.errors import OutOfResources

from autodeploy.kernels.triton_linear import skinny_linear

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
          "lm_head": (128256, 4096)}
KNOBS = list(itertools.product((16, 32, 64), (128, 256, 512), (4, 8), (3, 5)))  # block_n, block_k, warps, stages


def device_us(fn) -> float:
    return triton.testing.do_bench_cudagraph(fn, rep=30) * 1e3


def main() -> None:
    torch.manual_seed(0)
    best_total = {}
    for rows in (1, 8):
        print(f"\nrows {rows}: us (GB/s)")
        for name, (n, k) in SHAPES.items():
            w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5
            x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
            ref = F.linear(x, w)
            gbs = lambda us: n * k * 2 / us / 1e3  # noqa: E731
            cublas = device_us(lambda: F.linear(x, w))
            results = []
            for bn, bk, warps, stages in KNOBS:
                try:
                    y = skinny_linear(x, w, None, bn, bk, warps, stages)
                except OutOfResources:
                    continue
                err = ((y.float() - ref.float()).norm() / ref.float().norm()).item()
                if err > 1e-2:
                    print(f"  {name} {bn}/{bk}/{warps}/{stages}: WRONG rel err {err:.1e}")
                    continue
                results.append((device_us(lambda: skinny_linear(x, w, None, bn, bk, warps, stages)), bn, bk, warps, stages))
            results.sort()
            us, *knobs = results[0]
            best_total.setdefault(rows, []).append((name, cublas, us, knobs))
            top3 = ", ".join(f"{r[0]:.1f}us {r[1]}/{r[2]}/{r[3]}/{r[4]}" for r in results[:3])
            default = next((r[0] for r in results if tuple(r[1:]) == (32, 256, 4, 3)), float("nan"))
            print(f"  {name:8s} {n}x{k}: cuBLAS {cublas:7.1f} ({gbs(cublas):5.0f})  triton best {us:7.1f} "
                  f"({gbs(us):5.0f}) [{top3}]  32/256/4/3: {default:.1f}")
    for rows, items in best_total.items():
        print(f"rows {rows}: per layer cuBLAS {sum(c for n, c, _, _ in items if n != 'lm_head'):.1f} us, "
              f"triton best {sum(t for n, _, t, _ in items if n != 'lm_head'):.1f} us")


if __name__ == "__main__":
    main()
