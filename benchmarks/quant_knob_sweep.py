"""Wide knob sweep of the batch-1 quantized kernels (GEMV and tl.dot forms) on three Llama-3.1-8B shapes:
us per call over a pool of weight copies larger than L2, and GB/s of the format's bytes.
Usage: python3 benchmarks/quant_knob_sweep.py"""

import torch
import triton

from autodeploy.kernels.quant_format import quantize_fp8, quantize_int
from autodeploy.kernels.triton_quant_fp8_linear import skinny_fp8_linear
from autodeploy.kernels.triton_quant_gemv import gemv_fp8_linear, gemv_int_linear
from autodeploy.kernels.triton_quant_int_linear import skinny_int_linear

SHAPES = {"o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
POOL_BYTES = 200 * 2**20
KNOBS = {
    "fp8 gemv": [(4, 1024, 4, 3), (8, 1024, 4, 3), (4, 2048, 4, 3), (8, 2048, 8, 3), (16, 1024, 4, 3), (16, 512, 4, 3),
                 (16, 1024, 8, 3), (2, 2048, 4, 3), (4, 1024, 8, 3), (4, 1024, 4, 1)],
    "int4 gemv": [(4, 256, 4, 3), (8, 256, 4, 3), (4, 512, 4, 3), (2, 256, 4, 3), (2, 512, 4, 3), (4, 256, 8, 3),
                  (8, 256, 8, 3), (16, 128, 4, 3), (4, 128, 8, 3), (4, 256, 4, 1)],
    "fp8 dot": [(16, 512, 4, 4), (16, 1024, 4, 4), (32, 1024, 4, 4), (64, 512, 4, 4), (16, 256, 4, 6), (32, 512, 4, 4)],
    "int4 dot": [(16, 512, 4, 4), (32, 512, 4, 4), (16, 1024, 4, 4), (64, 256, 4, 4), (16, 256, 4, 6)],
}


def nbytes(ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


def timed(call, params) -> float:
    pool = [tuple(t.clone() for t in params) for _ in range(-(-POOL_BYTES // nbytes(params)))]
    return triton.testing.do_bench_cudagraph(lambda: [call(p) for p in pool], rep=30) * 1e3 / len(pool)


def main() -> None:
    torch.manual_seed(0)
    for name, (n, k) in SHAPES.items():
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
        q4 = quantize_int(w, 4, 128, True)[:2]
        f8 = quantize_fp8(w, True)
        runs = {
            "fp8 gemv": (lambda p, *kn: gemv_fp8_linear(x, p[0], p[1], None, None, 1, *kn), f8),
            "int4 gemv": (lambda p, *kn: gemv_int_linear(x, p[0], p[1], None, None, 4, 128, *kn), q4),
            "fp8 dot": (lambda p, *kn: skinny_fp8_linear(x, p[0], p[1], None, None, "token", *kn), f8),
            "int4 dot": (lambda p, *kn: skinny_int_linear(x, p[0], p[1], None, None, None, 4, 128, *kn), q4),
        }
        for label, (run, params) in runs.items():
            results = []
            for kn in KNOBS[label]:
                try:
                    us = timed(lambda p: run(p, *kn), params)
                    results.append((us, kn))
                except Exception as e:  # out of resources for a large tile
                    print(f"  {name} {label} {kn}: {type(e).__name__}")
            results.sort()
            print(f"{name:8s} {label:9s} " + ", ".join(f"{us:.1f}us {nbytes(params) / us / 1e3:.0f}GB/s {kn}" for us, kn in results[:4]), flush=True)


if __name__ == "__main__":
    main()
