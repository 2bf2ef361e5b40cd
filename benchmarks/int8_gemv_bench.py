"""INT8 weight-only linears (per channel, symmetric: `quantization.algo=int8 quantization.group_size=-1`) on the
Llama-3.1-8B shapes at 1-8 rows: the GEMV on its interleaved copy (kernels/triton_int_gemv.py, what
use_int_gemv runs up to its `rows`, at most 4) and the tensor-core dot on the same words (what runs past them)
against the canonical-layout GEMV of the Triton int_linear backend and bf16 F.linear, us per call, timed as
quant_knob_sweep.py times (CUDA graph over a pool of weight copies larger than L2): where the dot overtakes the
GEMV settles `use_int_gemv.rows`. Every path is first checked against the int_linear reference; --knobs sweeps
the GEMV's (block_n, num_warps) at one row.
Usage: python3 benchmarks/int8_gemv_bench.py [--knobs]"""

import sys

import torch
import torch.nn.functional as F

import autodeploy.kernels  # noqa: F401  (registers the ops)
from autodeploy.kernels.quant_format import quantize_int
from autodeploy.kernels.triton_int_dot import int_dot_linear
from autodeploy.kernels.triton_int_gemv import MAX_ROWS, gemv_coefficients, int_gemv, interleave_codes
from int4_tinygemm_bench import GEMV_KNOBS
from quant_knob_sweep import compared_row, shape_weights, sweep

BITS, GROUP, ROWS = 8, -1, (1, 2, 3, 4, 6, 8)
PATHS = ("gemv", "dot", "canonical", "bf16")


def paths(x: torch.Tensor) -> dict:
    """name -> (call on a parameter tuple, which of the shape's tensors it reads)."""
    found = {"gemv": (lambda p: int_gemv(x, *p, None, GROUP, BITS), "gemv"),
             "dot": (lambda p: int_dot_linear(x, *p, None, BITS, GROUP, True), "dot"),
             "canonical": (lambda p: torch.ops.autodeploy.int_linear_triton(x, *p, None, None, BITS, GROUP), "int8"),
             "bf16": (lambda p: F.linear(x, p[0]), "bf16")}
    if x.shape[0] > MAX_ROWS:
        del found["gemv"]
    return found


def main() -> int:
    ok = True
    for name, n, k, w in shape_weights():
        q8 = quantize_int(w, BITS, GROUP, True)
        words = interleave_codes(q8[0], BITS)
        tensors = {"bf16": (w,), "int8": q8, "gemv": (words, gemv_coefficients(q8[1], q8[2], BITS)),
                   "dot": (words, q8[1], q8[2])}
        print(f"{name} {n}x{k} ({n * k / 2**20:.0f} MiB of codes)", flush=True)
        if "--knobs" in sys.argv:
            x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
            ref = torch.ops.autodeploy.int_linear(x, *q8, None, None, BITS, GROUP).float()
            sweep("gemv 1 row", lambda p, bn, nw: int_gemv(x, *p, None, GROUP, BITS, bn, nw), tensors["gemv"],
                  GEMV_KNOBS, ref)
            continue
        print(f"  {'rows':>4s} " + " ".join(f"{p:>9s}" for p in PATHS) + "  (us)", flush=True)
        for rows in ROWS:
            x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
            ref = torch.ops.autodeploy.int_linear(x, *q8, None, None, BITS, GROUP).float()
            ok = compared_row(rows, paths(x), tensors, ref, PATHS) and ok
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
