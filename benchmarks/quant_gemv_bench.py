"""The quantized GEMV kernels (batch 1-4 decode) per Llama-3.1-8B shape, against the tl.dot skinny
kernels and bf16, with each format's bandwidth ceiling, plus a small knob sweep; and at 64 rows the
FP8 cuBLASLt path (one-kernel activation quantization) against bf16 cuBLAS.
Usage: python3 benchmarks/quant_gemv_bench.py"""

import torch
import torch.nn.functional as F
import triton

from autodeploy.kernels.quant_format import quantize_fp8, quantize_int
from autodeploy.kernels.triton_linear import skinny_linear
from autodeploy.kernels.triton_fp8_act_quant import quantize_rows_fp8
from autodeploy.kernels.triton_fp8_gemv import fp8_gemv
from autodeploy.kernels.triton_quant_fp8_linear import prequantized_fp8_linear, scaled_mm_fp8_linear, skinny_fp8_linear
from autodeploy.kernels.triton_quant_gemv import gemv_int_linear
from autodeploy.kernels.triton_quant_int_linear import skinny_int_linear

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
POOL_BYTES = 200 * 2**20
INT_KNOBS = [(8, 64, 4, 3), (4, 64, 4, 3), (16, 64, 4, 3), (8, 32, 4, 3), (8, 128, 4, 3), (8, 64, 2, 3),
             (8, 64, 8, 3), (8, 64, 4, 2), (8, 64, 4, 4), (4, 128, 4, 3), (16, 32, 4, 3)]
FP8_KNOBS = [(4, 4), (8, 4), (16, 4), (8, 2), (16, 2), (8, 8)]  # the FP8 GEMV's (block_n, num_warps)


def nbytes(ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


def timed(call, params) -> float:
    """us per call, each call on another copy of the weights (a pool > 2x the L2, as the layers are)."""
    pool = [tuple(t.clone() if t is not None else None for t in params) for _ in range(-(-POOL_BYTES // nbytes(params)))]
    return triton.testing.do_bench_cudagraph(lambda: [call(p) for p in pool], rep=40) * 1e3 / len(pool)


def main() -> None:
    torch.manual_seed(0)
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    bw = 2 * src.numel() / (triton.testing.do_bench_cudagraph(lambda: dst.copy_(src), rep=40) * 1e-3) / 1e9
    print(f"copy bandwidth {bw:.0f} GB/s")
    totals = {}
    for rows in (1, 2, 4):
        print(f"\nrows {rows}")
        for name, (n, k) in SHAPES.items():
            x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
            w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
            q4, s4, _ = quantize_int(w, 4, 128, True)
            q8, s8, _ = quantize_int(w, 8, -1, True)
            f8, fs = quantize_fp8(w, True)
            cases = {
                "bf16 skinny": (lambda p: skinny_linear(x, p[0]), (w,)),
                "int4 dot": (lambda p: skinny_int_linear(x, p[0], p[1], None, None, None, 4, 128), (q4, s4)),
                "int4 gemv": (lambda p: gemv_int_linear(x, p[0], p[1], None, None, 4, 128), (q4, s4)),
                "int8 gemv": (lambda p: gemv_int_linear(x, p[0], p[1], None, None, 8, -1), (q8, s8)),
                "fp8 dot": (lambda p: skinny_fp8_linear(x, p[0], p[1]), (f8, fs)),
                "fp8 quantized x": (lambda p: prequantized_fp8_linear(x, p[0], p[1]), (f8, fs)),
            }
            line = []
            for label, (call, params) in cases.items():
                us = timed(call, params)
                ceil = nbytes(params) / bw / 1e3
                totals[(rows, label)] = totals.get((rows, label), 0) + us
                totals[(rows, label + " ceil")] = totals.get((rows, label + " ceil"), 0) + ceil
                line.append(f"{label} {us:6.1f} ({100 * ceil / us:3.0f}%)")
            print(f"  {name:8s} " + "  ".join(line), flush=True)
            if rows == 1:
                sweep = sorted((timed(lambda p: gemv_int_linear(x, p[0], p[1], None, None, 4, 128, *kn), (q4, s4)), kn)
                               for kn in INT_KNOBS)
                print("    int4 gemv knobs (block_n, block_w, warps, stages): " + ", ".join(f"{t:.1f} {kn}" for t, kn in sweep[:4]))
                qx, sx = quantize_rows_fp8(x)
                sweep = sorted((timed(lambda p: fp8_gemv(qx, sx, *p, None, x.dtype, -1, *kn), (f8, fs)), kn)
                               for kn in FP8_KNOBS)
                print("    fp8 gemv knobs (block_n, warps): " + ", ".join(f"{t:.1f} {kn}" for t, kn in sweep[:4]),
                      flush=True)
    for rows in (1, 2, 4):
        print(f"rows {rows} per layer: " + ", ".join(f"{lab} {totals[(rows, lab)]:.1f} us ({100 * totals[(rows, lab + ' ceil')] / totals[(rows, lab)]:.0f}%)"
                                              for lab in ("bf16 skinny", "int4 dot", "int4 gemv", "int8 gemv", "fp8 dot", "fp8 quantized x")))
    print("\nrows 64: bf16 cuBLAS vs fp8 scaled_mm (with one-kernel activation quantization)")
    for name, (n, k) in SHAPES.items():
        x = torch.randn(64, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
        f8, fs = quantize_fp8(w, True)
        b = timed(lambda p: F.linear(x, p[0]), (w,))
        f = timed(lambda p: scaled_mm_fp8_linear(x, p[0], p[1]), (f8, fs))
        print(f"  {name:8s} bf16 {b:6.1f} us  fp8 {f:6.1f} us  ({b / f:.2f}x)", flush=True)


if __name__ == "__main__":
    main()
