"""INT4 g128 (asymmetric) linears on the Llama-3.1-8B shapes: PyTorch's tinygemm against our Triton int_linear
backend, our CUDA-core GEMV on its interleaved copy (up to 4 rows), the tensor-core GEMV on the same words (up to
8 rows) and bf16 F.linear, us per call at 1-64 rows, timed as quant_knob_sweep.py times (CUDA graph over a pool
of weight copies larger than L2). Settles use_int4_tinygemm's max_rows: the last row count where tinygemm wins
on every shape. Every path is first checked against the int_linear reference; --check stops there; --knobs
sweeps the CUDA-core GEMV's (block_n, num_warps), --mma-knobs the tensor-core GEMV's (tiles, split, unroll).
Usage: python3 benchmarks/int4_tinygemm_bench.py [--check | --knobs | --mma-knobs]"""

import sys

import torch
import torch.nn.functional as F

import autodeploy.kernels  # noqa: F401  (registers the ops)
from autodeploy.kernels.int4_tinygemm import tinygemm_weights
from autodeploy.kernels.quant_format import quantize_int
from autodeploy.kernels.triton_int4_mma_gemv import MAX_ROWS as MMA_ROWS
from autodeploy.kernels.triton_int4_mma_gemv import int4_mma_gemv
from autodeploy.kernels.triton_int_gemv import MAX_ROWS, gemv_coefficients, int_gemv, interleave_codes
from quant_knob_sweep import shape_weights, sweep, timed

ROWS = (1, 2, 4, 8, 16, 32, 64)
GROUP = 128
GEMV_KNOBS = [(4, 1), (8, 1), (4, 2), (8, 2), (16, 2), (4, 4), (8, 4)]  # (block_n, num_warps)
MMA_KNOBS = [(t, sp, u) for t in (1, 2) for sp in (4, 8, 16) for u in (2, 4, 8) if t * sp <= 16]  # tiles, split, unroll


def paths(x: torch.Tensor) -> dict:
    """name -> (call on a parameter tuple, which of the shape's tensors it reads)."""
    found = {"tinygemm": (lambda p: torch.ops.aten._weight_int4pack_mm(x, p[0], GROUP, p[1]), "tinygemm"),
             "triton": (lambda p: torch.ops.autodeploy.int_linear_triton(x, *p, None, None, 4, GROUP), "int4"),
             "bf16": (lambda p: F.linear(x, p[0]), "bf16")}
    if x.shape[0] <= MAX_ROWS:
        found["gemv"] = (lambda p: int_gemv(x, *p, None, GROUP, 4), "gemv")
    if x.shape[0] <= MMA_ROWS:
        found["mma"] = (lambda p: int4_mma_gemv(x, *p, None, GROUP), "gemv")
    return found


def check(tensors: dict, k: int) -> bool:
    ok = True
    for rows in ROWS:
        x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
        ref = torch.ops.autodeploy.int_linear(x, *tensors["int4"], None, None, 4, GROUP).float()
        for name, (call, params) in paths(x).items():
            if name == "bf16":
                continue
            err = ((call(tensors[params]).float() - ref).abs().max() / ref.abs().max()).item()
            if not err < 1e-2:
                print(f"  {name} rows {rows}: WRONG, max error {err:.3g} of the largest output", flush=True)
                ok = False
    return ok


def main() -> int:
    only_check, knobs, mma_knobs = "--check" in sys.argv, "--knobs" in sys.argv, "--mma-knobs" in sys.argv
    wins: dict[int, bool] = dict.fromkeys(ROWS, True)
    ok = True
    for name, n, k, w in shape_weights():
        q4 = quantize_int(w, 4, GROUP, False)
        tensors = {"bf16": (w,), "int4": q4, "tinygemm": tinygemm_weights(*q4, GROUP),
                   "gemv": (interleave_codes(q4[0], 4), gemv_coefficients(q4[1], q4[2], 4))}
        ok &= check(tensors, k)
        print(f"{name} {n}x{k}: checked", flush=True)
        if only_check:
            continue
        if mma_knobs:
            for rows in (1, 8):
                x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
                ref = torch.ops.autodeploy.int_linear(x, *q4, None, None, 4, GROUP).float()
                sweep(f"mma {rows} rows", lambda p, *kn: int4_mma_gemv(x, *p, None, GROUP, *kn), tensors["gemv"],
                      MMA_KNOBS, ref)
            continue
        if knobs:
            for rows in (1, 2):
                x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
                ref = torch.ops.autodeploy.int_linear(x, *q4, None, None, 4, GROUP).float()
                sweep(f"gemv {rows} rows", lambda p, bn, nw: int_gemv(x, *p, None, GROUP, 4, bn, nw), tensors["gemv"],
                      GEMV_KNOBS, ref)
            continue
        print(f"  {'rows':>4s} " + " ".join(f"{p:>9s}" for p in ("tinygemm", "triton", "bf16", "gemv", "mma"))
              + "  (us)", flush=True)
        for rows in ROWS:
            x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
            us = {p: timed(call, tensors[params]) for p, (call, params) in paths(x).items()}
            wins[rows] &= us["tinygemm"] < us["triton"]
            print(f"  {rows:4d} " + " ".join(f"{us[p]:9.1f}" if p in us else f"{'-':>9s}"
                                            for p in ("tinygemm", "triton", "bf16", "gemv", "mma")), flush=True)
    if not (only_check or knobs or mma_knobs):
        faster = [r for r in ROWS if all(wins[s] for s in ROWS if s <= r)]
        print(f"tinygemm faster on every shape up to {faster[-1] if faster else 0} rows "
              "(use_int4_tinygemm.max_rows)", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
