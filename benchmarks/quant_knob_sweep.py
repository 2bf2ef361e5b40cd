"""Knob sweep of the decode linears (bf16 skinny, FP8 W8A8, INT4 g128) on the Llama-3.1-8B shapes: us per call
over a pool of weight copies larger than L2 (CUDA graph, no PDL), and GB/s of the bytes each format reads.
Batch 1 for every kernel form, batch 64 for the many-row paths. Each line: the best four knob sets.
--given --group 128: the same dot on per-token-group activation scales (the online fp8 default) with K split
over programs, the backend's default choice, cuBLASLt's 1 x 128 block-scaled GEMM, and the dot tiled over
rows at 256 / 2048 rows against cuBLASLt's per-token FP8 GEMM.
Usage: python3 benchmarks/quant_knob_sweep.py [--quick | --given [--group G] [--rows 1,64]]"""

import sys

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

import autodeploy.kernels  # noqa: F401  (registers the reference ops)

from autodeploy.kernels.quant_format import quantize_fp8, quantize_int
from autodeploy.kernels.triton_fp8_act_quant import quantize_rows_fp8
from autodeploy.kernels.triton_linear import skinny_linear
from autodeploy.kernels.triton_quant_fp8_linear import (blockwise_scaled_mm, given_fp8_linear, scaled_mm_fp8_linear,
                                                         skinny_fp8_linear)
from autodeploy.kernels.triton_quant_gemv import gemv_int_linear
from autodeploy.kernels.triton_quant_int_linear import dequantize_int_triton, skinny_int_linear

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
POOL_BYTES = 256 * 2**20
# (block_n, block_k, warps, stages, swap)
BF16 = [(32, 512, 4, 5, False), (32, 256, 4, 6, False), (64, 256, 4, 5, False), (16, 512, 4, 6, False),
        (64, 256, 4, 5, True), (64, 512, 4, 4, True), (128, 256, 4, 4, True), (128, 128, 4, 6, True),
        (64, 128, 4, 8, True), (128, 256, 8, 4, True)]
FP8 = [(32, 512, 4, 4, False), (64, 512, 4, 4, False), (32, 1024, 4, 3, False), (64, 512, 4, 4, True),
       (128, 512, 4, 4, True), (64, 1024, 4, 3, True), (128, 256, 4, 6, True), (256, 256, 8, 4, True),
       (64, 256, 4, 6, True), (128, 512, 8, 4, True), (128, 1024, 8, 3, True)]
# (block_n, block_w, warps, stages, tile_scale)
INT_GEMV = [(8, 16, 4, 3, True), (16, 16, 4, 3, True), (32, 16, 4, 3, True), (64, 16, 4, 4, True),
            (32, 16, 4, 5, True), (16, 16, 2, 4, True), (64, 8, 4, 4, True), (128, 16, 8, 3, True),
            (8, 64, 4, 3, False), (16, 32, 4, 3, False), (32, 32, 8, 3, False), (4, 64, 4, 3, False)]
# (block_n, block_k, warps, stages, swap)
INT_DOT = [(32, 512, 8, 4, False), (64, 256, 4, 4, True), (128, 256, 4, 4, True), (64, 512, 4, 3, True),
           (128, 128, 4, 5, True), (64, 128, 4, 5, True), (256, 128, 8, 4, True), (128, 256, 8, 3, True)]
FP8_M64 = [(64, 128, 4, 4, False), (64, 256, 4, 4, False), (128, 128, 4, 4, True), (128, 128, 8, 4, False),
           (64, 128, 4, 6, False), (128, 256, 8, 3, True)]


def nbytes(ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts if isinstance(t, torch.Tensor))


def timed(call, params) -> float:
    pool = [tuple(t.clone() if isinstance(t, torch.Tensor) else t for t in params)
            for _ in range(-(-POOL_BYTES // nbytes(params)))]
    return triton.testing.do_bench_cudagraph(lambda: [call(p) for p in pool], rep=25) * 1e3 / len(pool)


def shape_weights(seed: int = 0):
    """(name, N, K, bf16 weight [N, K] / sqrt(K) on the GPU) of each 8B shape, seeded once: what the GEMV benches
    quantize."""
    torch.manual_seed(seed)
    for name, (n, k) in SHAPES.items():
        yield name, n, k, torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5


def compared_row(rows: int, found: dict, tensors: dict, ref: torch.Tensor, columns: tuple[str, ...]) -> bool:
    """One line of us per call for `found` (name -> (call on a parameter tuple, key of its tensors)), under
    `columns` ("-" where a path does not run); every path but bf16 first checked against ref. False: one is wrong."""
    ok = True
    for path, (call, params) in found.items():
        err = ((call(tensors[params]).float() - ref).abs().max() / ref.abs().max()).item()
        if path != "bf16" and not err < 1e-2:
            print(f"  {path} rows {rows}: WRONG, max error {err:.3g} of the largest output", flush=True)
            ok = False
    us = {p: timed(call, tensors[params]) for p, (call, params) in found.items()}
    print(f"  {rows:4d} " + " ".join(f"{us[p]:9.1f}" if p in us else f"{'-':>9s}" for p in columns), flush=True)
    return ok


def sweep(label: str, run, params, knobs, ref: torch.Tensor | None = None) -> None:
    results = []
    for kn in knobs:
        try:
            if ref is not None:  # every knob set's output checked once against the format's reference
                err = ((run(params, *kn).float() - ref).abs().max() / ref.abs().max()).item()
                if not err < 2e-2:
                    print(f"    {label} {kn}: WRONG, max error {err:.3g} of the largest output", flush=True)
                    continue
            results.append((timed(lambda p: run(p, *kn), params), kn))
        except Exception as e:  # out of resources for a large tile, an unsupported layout
            print(f"    {label} {kn}: {type(e).__name__}: {str(e).splitlines()[0][:120]}", flush=True)
    results.sort(key=lambda r: r[0])
    print(f"  {label:14s} " + ", ".join(f"{us:.1f}us {nbytes(params) / us / 1e3:.0f}GB/s {kn}"
                                       for us, kn in results[:4]), flush=True)


@triton.jit
def _read_kernel(a_ptr, out_ptr, n_words, BLOCK: tl.constexpr):
    """Streams int32 words, 16 bytes a thread per load, XOR-folds them so the loads stay: a read-only ceiling."""
    start = tl.program_id(0) * BLOCK
    acc = tl.zeros([BLOCK], tl.int32)
    for offset in range(start, n_words, tl.num_programs(0) * BLOCK):
        acc ^= tl.load(a_ptr + offset + tl.arange(0, BLOCK), mask=offset + tl.arange(0, BLOCK) < n_words, other=0)
    tl.store(out_ptr + tl.program_id(0), tl.xor_sum(acc, axis=0))


def read_words(a: torch.Tensor, programs: int, block: int = 4096) -> torch.Tensor:
    """XOR of each program's share of the int32 words of a (programs stride through a in blocks)."""
    out = torch.empty(programs, dtype=torch.int32, device=a.device)
    _read_kernel[(programs,)](a, out, a.numel(), BLOCK=block, num_warps=8)
    return out


def bandwidth() -> None:
    """Copy bandwidth (read + write bytes, the bench's ceiling) and a read-only stream's, which decode GEMMs
    approach: a GEMM beyond 100 % of the copy bandwidth is possible only if reads alone go faster."""
    a = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    ms = triton.testing.do_bench(lambda: b.copy_(a), rep=200)
    words = a.view(torch.int32)
    sms = torch.cuda.get_device_properties(a.device).multi_processor_count
    reads = {p: triton.testing.do_bench(lambda: read_words(words, p), rep=200) for p in (sms, 2 * sms, 4 * sms)}
    print(f"copy {2 * a.numel() / ms / 1e6:.0f} GB/s; read " + ", ".join(
        f"{a.numel() / t / 1e6:.0f} GB/s ({p // sms} programs per SM)" for p, t in reads.items()), flush=True)


GIVEN = {1: [(64, 512, 4, 4, True), (64, 256, 4, 6, True), (128, 256, 4, 5, True), (64, 512, 4, 5, True),
             (32, 512, 4, 6, True), (128, 512, 4, 3, True), (64, 1024, 4, 2, True), (64, 512, 8, 4, True)],
         64: [(128, 256, 4, 4, True), (128, 128, 4, 6, True), (64, 256, 4, 4, True), (256, 128, 8, 4, True),
              (128, 256, 8, 3, True), (64, 512, 4, 3, True), (128, 128, 8, 5, True)]}


# (block_n, block_k, warps, stages, swap, split_k, block_m): the same dot with K split over programs; wgmma
# (4 warps, 64+ rows on the MMA's M) waits for each group's MMA, mma.sync (2 warps, or 16-32 rows of x as M) does not
SPLITS = [(bn, 128, 4, st, True, sp, None) for bn in (64, 128) for st in (4, 6) for sp in (1, 2, 4, 8)]
MMA_SYNC = {1: [(bn, 128, 4, st, False, sp, 16) for bn, st in ((32, 6), (64, 6), (128, 4)) for sp in (1, 2, 4)]
            + [(64, 128, 2, 6, True, sp, None) for sp in (1, 2, 4)],
            64: [(bn, 128, w, 4, False, sp, bm) for bn, w, bm in ((64, 4, 16), (64, 4, 32), (128, 4, 32), (128, 8, 32))
                 for sp in (1, 2)] + [(64, 128, 2, 4, True, sp, None) for sp in (1, 2)]}


# (block_m, block_n, block_k, warps, stages) of the dot tiled over rows (group scales past 64 rows)
TILED = [(64, 128, 128, 4, 3), (128, 128, 128, 8, 3), (64, 256, 128, 8, 3), (128, 64, 128, 4, 4), (64, 64, 128, 4, 4)]


def given_sweep(group: int, only_rows: set[int] | None = None) -> None:
    """The e4m3 x e4m3 dot on activations quantized beforehand (`prequantized_fp8_linear`), at 1 / 16 / 64 rows;
    with groups (group > 0) also tiled over 256 / 2048 rows. `only_rows`: those row counts instead (any)."""
    act = "group" if group > 0 else "token"
    rows_run = sorted(only_rows) if only_rows else [1, 16, 64] + ([256, 2048] if group > 0 else [])
    cases = [(rows, GIVEN[1] if rows == 1 else GIVEN[1][:4] if rows <= 16 else GIVEN[64] if rows <= 64 else TILED)
             for rows in rows_run]
    for name, (n, k) in SHAPES.items():
        print(f"{name} {n}x{k}", flush=True)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
        f8 = quantize_fp8(w, True)
        for rows, knobs in cases:
            x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
            ref = torch.ops.autodeploy.fp8_linear(x, *f8, None, None, act, group).float()
            qx, sx = quantize_rows_fp8(x, group)
            if rows > 64:
                sweep(f"tiled {rows}", lambda p, *kn: skinny_fp8_linear(
                    qx, p[0], p[1], None, None, "token", *kn[1:], swap=False, x_scale=sx, out_dtype=torch.bfloat16,
                    x_group=group, block_m=kn[0]), f8, knobs, ref)
            else:
                if group < 0:
                    sweep(f"given {rows}", lambda p, *kn: skinny_fp8_linear(
                        qx, p[0], p[1], None, None, "token", *kn, x_scale=sx, out_dtype=torch.bfloat16), f8, knobs, ref)
                for label, knobs in (("split", SPLITS), ("mma.sync", MMA_SYNC[1 if rows <= 16 else 64])):
                    sweep(f"{label} {rows}", lambda p, *kn: skinny_fp8_linear(
                        qx, p[0], p[1], None, None, "token", *kn[:5], x_scale=sx, out_dtype=torch.bfloat16,
                        x_group=group, split_k=kn[5], block_m=kn[6]), f8, knobs, ref)
                sweep(f"default {rows}", lambda p: given_fp8_linear(qx, sx, p[0], p[1], None, torch.bfloat16, group),
                      f8, [()], ref)
            if group == 128:
                sweep(f"blockwise scaled_mm {rows}", lambda p: blockwise_scaled_mm(
                    qx, sx, p[0], p[1], None, torch.bfloat16), f8, [()], ref)
            sweep(f"act quant {rows}", lambda p: quantize_rows_fp8(x, group), f8, [()])
            sweep(f"bf16 cublas {rows}", lambda p: F.linear(x, p[0]), (w,), [()])
            if rows > 1:
                sweep(f"fp8 scaled_mm {rows}", lambda p: scaled_mm_fp8_linear(x, p[0], p[1]), f8, [()])


def main() -> None:
    torch.manual_seed(0)
    bandwidth()
    if "--given" in sys.argv:
        rows = {int(r) for r in sys.argv[sys.argv.index("--rows") + 1].split(",")} if "--rows" in sys.argv else None
        return given_sweep(int(sys.argv[sys.argv.index("--group") + 1]) if "--group" in sys.argv else -1, rows)
    quick = "--quick" in sys.argv
    for name, (n, k) in SHAPES.items():
        print(f"{name} {n}x{k}", flush=True)
        x1 = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        x64 = torch.randn(64, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
        f8 = quantize_fp8(w, True)
        q4 = quantize_int(w, 4, 128, True)[:2]
        refs = {rows: (F.linear(x.float(), w.float()),
                       torch.ops.autodeploy.fp8_linear(x, *f8, None, None, "token").float(),
                       torch.ops.autodeploy.int_linear(x, *q4, None, None, None, 4, 128).float())
                for rows, x in ((1, x1), (64, x64))}
        sweep("bf16 cublas", lambda p: F.linear(x1, p[0]), (w,), [()])
        sweep("bf16 skinny", lambda p, *kn: skinny_linear(x1, p[0], None, *kn), (w,), BF16[:3] if quick else BF16, refs[1][0])
        sweep("fp8 dot", lambda p, *kn: skinny_fp8_linear(x1, p[0], p[1], None, None, "token", *kn), f8,
              FP8[:3] if quick else FP8, refs[1][1])
        qx, sx = quantize_rows_fp8(x1)
        sweep("fp8 dot given", lambda p, *kn: skinny_fp8_linear(qx, p[0], p[1], None, None, "token", *kn, x_scale=sx,
                                                               out_dtype=torch.bfloat16), f8, FP8[3:7], refs[1][1])
        sweep("fp8 act quant", lambda p: quantize_rows_fp8(x1), f8, [()])
        sweep("int4 gemv", lambda p, *kn: gemv_int_linear(x1, p[0], p[1], None, None, 4, 128, *kn), q4,
              INT_GEMV[:3] if quick else INT_GEMV, refs[1][2])
        sweep("int4 dot", lambda p, *kn: skinny_int_linear(x1, p[0], p[1], None, None, None, 4, 128, *kn[:4],
                                                          swap=kn[4]), q4, INT_DOT[:3] if quick else INT_DOT, refs[1][2])
        sweep("bf16 cublas 64", lambda p: F.linear(x64, p[0]), (w,), [()])
        sweep("fp8 scaled_mm 64", lambda p: scaled_mm_fp8_linear(x64, p[0], p[1]), f8, [()])
        sweep("fp8 dot 64", lambda p, *kn: skinny_fp8_linear(x64, p[0], p[1], None, None, "token", *kn), f8, FP8_M64, refs[64][1])
        sweep("int4 deq+mm 64", lambda p: F.linear(x64, dequantize_int_triton(p[0], p[1], None, None, 4, 128, k,
                                                                              torch.bfloat16)), q4, [()])
        sweep("int4 dot 64", lambda p, *kn: skinny_int_linear(x64, p[0], p[1], None, None, None, 4, 128, *kn[:4],
                                                             swap=kn[4]), q4, INT_DOT[1:5], refs[64][2])


if __name__ == "__main__":
    main()
