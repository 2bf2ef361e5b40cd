"""FP8 W8A8 linears (per-channel weights, activations in groups of 128 columns: the `quantization.algo=fp8` default)
on the Llama-3.1-8B shapes at 1-8 rows, activations quantized beforehand: the GEMV (kernels/triton_fp8_gemv.py, up to
4 rows; decode runs it at 1) against the tensor-core dot that `given_fp8_linear` runs past its GEMV rows and bf16
F.linear, us per call, timed as quant_knob_sweep.py times (CUDA graph over a pool of weight copies larger than L2).
Settles where the GEMV hands over to the dot. Every path is first checked against the fp8_linear_quantized_input
reference; --knobs sweeps the GEMV's (block_n, num_warps) at one row instead.
Usage: python3 benchmarks/fp8_gemv_bench.py [--knobs]"""

import sys

import torch
import torch.nn.functional as F

import autodeploy.kernels  # noqa: F401  (registers the ops)
from autodeploy.kernels.quant_format import FP8_DTYPE
from autodeploy.kernels.triton_fp8_gemv import MAX_ROWS, fp8_gemv
from autodeploy.kernels import triton_quant_fp8_linear as backend
from quant_knob_sweep import compared_row, shape_weights, sweep

GROUP, ROWS = 128, (1, 2, 3, 4, 8)
PATHS = ("gemv", "dot", "bf16")
KNOBS = [(4, 4), (8, 4), (16, 4), (8, 2), (16, 2), (32, 4), (8, 8), (16, 8)]  # (block_n, num_warps)


def dot(q: torch.Tensor, scale: torch.Tensor, params: tuple) -> torch.Tensor:
    """given_fp8_linear with its GEMV off: the tensor-core dot it runs past FP8_GEMV_ROWS rows."""
    saved, backend.FP8_GEMV_ROWS = backend.FP8_GEMV_ROWS, 0
    try:
        return backend.given_fp8_linear(q, scale, *params, None, torch.bfloat16, GROUP)
    finally:
        backend.FP8_GEMV_ROWS = saved


def paths(q: torch.Tensor, scale: torch.Tensor, x: torch.Tensor) -> dict:
    """name -> (call on a parameter tuple, which of the shape's tensors it reads)."""
    found = {"gemv": (lambda p: fp8_gemv(q, scale, *p, None, torch.bfloat16, GROUP), "fp8"),
             "dot": (lambda p: dot(q, scale, p), "fp8"),
             "bf16": (lambda p: F.linear(x, p[0]), "bf16")}
    if q.shape[0] > MAX_ROWS:
        del found["gemv"]
    return found


def main() -> int:
    ok = True
    for name, n, k, w in shape_weights():
        ws = w.float().abs().amax(dim=1) / 448
        tensors = {"bf16": (w,), "fp8": ((w.float() / ws[:, None]).to(FP8_DTYPE), ws)}
        print(f"{name} {n}x{k} ({n * k / 2**20:.0f} MiB of weights)", flush=True)
        for rows in (1,) if "--knobs" in sys.argv else ROWS:
            x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
            q, scale = torch.ops.autodeploy.quantize_fp8_per_token(x, GROUP)
            ref = torch.ops.autodeploy.fp8_linear_quantized_input(q, scale, *tensors["fp8"], None, torch.float32, GROUP)
            if "--knobs" in sys.argv:
                sweep("gemv 1 row", lambda p, bn, nw: fp8_gemv(q, scale, *p, None, torch.bfloat16, GROUP, bn, nw),
                      tensors["fp8"], KNOBS, ref)
                continue
            if rows == 1:
                print(f"  {'rows':>4s} " + " ".join(f"{p:>9s}" for p in PATHS) + "  (us)", flush=True)
            ok = compared_row(rows, paths(q, scale, x), tensors, ref, PATHS) and ok
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
