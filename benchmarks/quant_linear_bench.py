"""Quantized skinny linears on the GPU, Llama-3.1-8B shapes: INT4 g128 / INT8 per-channel weight-only and
FP8 W8A8 against bf16 cuBLAS, per row count, with the bandwidth ceiling each format's bytes allow.

Device time inside a CUDA graph (triton.testing.do_bench_cudagraph), each timed call walking a pool of
distinct weight copies (> 2x L2) as the layers do. The ceiling is the format's bytes (weights + scales
+ zeros) over the copy bandwidth measured here (read + write of a 1 GiB buffer, counted once each).
At batch 1, the best INT4 and FP8 skinny-kernel knobs of a sweep are shown under each shape (the packed tiles are 4x
smaller than bf16's, so keeping enough bytes in flight needs wider K tiles or deeper pipelines).
Usage: python3 benchmarks/quant_linear_bench.py [ROWS ...]   (default 1 16 64)"""

import itertools
import sys

import torch
import torch.nn.functional as F
import triton
from triton.runtime.errors import OutOfResources

from autodeploy.kernels.quant_format import quantize_fp8, quantize_int
from autodeploy.kernels.triton_quant_fp8_linear import fp8_linear, skinny_fp8_linear
from autodeploy.kernels.triton_quant_int_linear import int_linear, skinny_int_linear

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
POOL_BYTES = 160 * 2**20


def device_us(fn, calls: int) -> float:
    return triton.testing.do_bench_cudagraph(fn, rep=30) * 1e3 / calls


def copy_bandwidth_gbs() -> float:
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() / device_us(lambda: dst.copy_(src), 1) / 1e3


def nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def pool_of(make, bytes_each: int) -> list:
    return [make() for _ in range(-(-POOL_BYTES // bytes_each))]


def clone(params):
    if isinstance(params, tuple):
        return tuple(t.clone() if t is not None else None for t in params)
    return params.clone()


# knob tuples after the tensors: int4 (block_n, block_k, warps, stages, splat_words); fp8 (block_n, block_k,
# warps, stages)
INT4_KNOBS = sorted(itertools.product((16, 32), (256, 512), (4, 8), (4, 6), (False, True)))
FP8_KNOBS = sorted(itertools.product((32, 64), (256, 512), (4, 8), (3, 4)))


def sweep(label: str, run, params: tuple, knobs: list) -> None:
    """Time run(params_copy, *knob) over a pool of weight copies for every knob; print the best three."""
    pool = pool_of(lambda: clone(params), nbytes(*params))
    best = []
    for knob in knobs:
        try:
            best.append((device_us(lambda: [run(p, *knob) for p in pool], len(pool)), *knob))
        except OutOfResources:
            continue
    best.sort()
    print(f"    {label} best knobs (us knobs): " + ", ".join(f"{b[0]:.1f} " + "/".join(map(str, b[1:])) for b in best[:3]))


def main(rows_list: list[int]) -> None:
    torch.manual_seed(0)
    bandwidth = copy_bandwidth_gbs()
    print(f"copy bandwidth {bandwidth:.0f} GB/s (the ceiling below)")
    for rows in rows_list:
        print(f"\nrows {rows}: us per call, and % of the format's bandwidth ceiling")
        totals: dict[str, float] = {}
        for name, (n, k) in SHAPES.items():
            x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
            w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
            int4 = quantize_int(w, 4, 128, True)
            int8 = quantize_int(w, 8, -1, True)
            fp8 = quantize_fp8(w, True)
            cases = {
                "bf16 cuBLAS": (lambda p: F.linear(x, p), w, (w,)),
                "int4 g128": (lambda p: int_linear(x, p[0], p[1], None, None, None, 4, 128), int4, int4),
                "int8 chan": (lambda p: int_linear(x, p[0], p[1], None, None, None, 8, -1), int8, int8),
                "fp8 W8A8": (lambda p: fp8_linear(x, p[0], p[1]), fp8, fp8),
            }
            line = []
            for label, (call, params, parts) in cases.items():
                size = nbytes(*parts)
                pool = pool_of(lambda: clone(params), size)
                us = device_us(lambda: [call(p) for p in pool], len(pool))
                ceiling = size / bandwidth / 1e3
                totals[label] = totals.get(label, 0.0) + us
                totals[label + " ceiling"] = totals.get(label + " ceiling", 0.0) + ceiling
                line.append(f"{label} {us:6.1f} ({100 * ceiling / us:3.0f}%)")
            print(f"  {name:8s} {n}x{k}: " + "  ".join(line))
            if rows == 1:
                sweep("int4", lambda p, *knob: skinny_int_linear(x, *p, None, None, 4, 128, *knob), int4, INT4_KNOBS)
                sweep("fp8", lambda p, *knob: skinny_fp8_linear(x, *p, None, None, "token", *knob), fp8, FP8_KNOBS)
        summary = ", ".join(f"{label} {totals[label]:.1f} us ({100 * totals[label + ' ceiling'] / totals[label]:.0f}% "
                            f"of ceiling, {totals['bf16 cuBLAS'] / totals[label]:.2f}x bf16)"
                            for label in ("bf16 cuBLAS", "int4 g128", "int8 chan", "fp8 W8A8"))
        print(f"  per layer: {summary}")


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [1, 16, 64])
