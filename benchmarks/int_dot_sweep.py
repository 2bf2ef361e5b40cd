"""The INT4 / INT8 tensor-core dot (kernels/triton_int_dot.py) at decode batches against what runs those rows
now: us per call for each Llama-3.1-8B shape at 16 / 32 / 64 / 128 rows, weights colder than L2 (quant_knob_sweep.py's
timing, CUDA graph, no PDL). Peers in the same run: the Triton backend (`int_linear_triton`: skinny dot up to 16
rows, dequantize + cuBLAS beyond), tinygemm for INT4, bf16 cuBLAS. The dot reads the GEMV's re-packed words (how
CUDA stores INT linears) with the tile and split `int_dot_linear` picks, then the best knob sets of a sweep, each
checked against the int_linear reference first.
Usage: python3 benchmarks/int_dot_sweep.py [--rows 16,32,64,128]"""

import argparse

import torch
import torch.nn.functional as F

import autodeploy.kernels  # noqa: F401  (registers the reference ops)
from autodeploy.kernels.int4_tinygemm import tinygemm_weights
from autodeploy.kernels.quant_format import quantize_int
from autodeploy.kernels.triton_int_dot import DOT_ROWS, int_dot, int_dot_linear
from autodeploy.kernels.triton_int_gemv import interleave_codes
from quant_knob_sweep import SHAPES, sweep, timed

SCHEMES = {"int4 g128": (4, 128), "int8 per channel": (8, -1)}
# (block_m, block_n, block_k, warps, stages, swap, splat, split_k) per row count: tiles no taller than the rows need
SMALL = [(16, 32, 128, 2, 4, False, False, 1), (16, 32, 128, 2, 4, False, False, 2),
         (16, 32, 128, 2, 4, False, False, 4), (16, 128, 128, 4, 4, True, False, 1),
         (16, 128, 128, 4, 4, True, False, 2), (16, 64, 128, 4, 4, True, False, 2)]
MID = [(64, 64, 128, 4, 4, False, False, 1), (64, 64, 128, 4, 4, False, False, 2), (64, 64, 128, 4, 4, False, False, 4),
       (64, 128, 128, 4, 4, True, False, 1), (64, 128, 128, 4, 4, True, False, 2), (64, 256, 128, 8, 3, False, False, 1),
       (32, 64, 128, 4, 4, True, False, 2)]
LARGE = [(128, 64, 128, 4, 4, False, False, 1), (128, 64, 128, 4, 4, False, False, 2),
         (128, 128, 64, 8, 4, False, False, 1), (64, 64, 128, 4, 4, False, False, 2)]


def knobs_for(rows: int) -> list[tuple]:
    return SMALL if rows <= 16 else MID if rows <= 64 else LARGE


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="16,32,64,128")
    row_counts = [int(r) for r in parser.parse_args().rows.split(",")]
    torch.manual_seed(0)
    for scheme, (bits, group) in SCHEMES.items():
        for name, (n, k) in SHAPES.items():
            w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
            q = quantize_int(w, bits, group, False)
            repacked = (interleave_codes(q[0], bits), *q[1:])
            tiny = tinygemm_weights(*q, group) if bits == 4 else None
            print(f"{scheme} {name} {n}x{k}", flush=True)
            for rows in row_counts:
                x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
                ref = torch.ops.autodeploy.int_linear(x, *q, None, None, bits, group).float()
                backend = timed(lambda p: torch.ops.autodeploy.int_linear_triton(x, *p, None, None, bits, group), q)
                bf16 = timed(lambda p: F.linear(x, p[0]), (w,))
                peers = f"backend {backend:.1f} us, bf16 {bf16:.1f} us"
                if tiny is not None:
                    tg = timed(lambda p: torch.ops.aten._weight_int4pack_mm(x, p[0], group, p[1]), tiny)
                    peers += f", tinygemm {tg:.1f} us"
                if rows <= DOT_ROWS:
                    picked = timed(lambda p: int_dot_linear(x, *p, None, bits, group, True), repacked)
                    peers += f", int_dot_linear {picked:.1f} us"
                print(f"  rows {rows}: {peers}", flush=True)
                sweep(f"dot {rows}", lambda p, *kn: int_dot(x, *p, None, bits, group, True, *kn), repacked,
                      knobs_for(rows), ref)


if __name__ == "__main__":
    main()
