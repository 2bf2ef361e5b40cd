"""cuBLASLt's FP8 GEMMs at 64 and 8,192 rows on the Llama-3.1-8B shapes, us per call over weights colder than L2:
x in 1 x 128 groups against the weight's per-channel scale repeated over K's groups (the default FP8 path), against
128 x 128 weight blocks (DeepSeek-V3 / Qwen3-FP8's layout; max error against the dequantized reference printed),
per-token row-wise scales, and bf16 cuBLAS. H200 figures: BENCHMARKS.md session 20.
Usage (repository root, a CUDA 12.9+ sm_90 device): python3 benchmarks/fp8_block_gemm_bench.py [--rows 64,8192]
(rows between them place BLOCK_WEIGHT_ROWS, where the 128 x 128 GEMM starts to win)."""
import sys
sys.path.insert(0, "benchmarks")
import torch
import torch.nn.functional as F
import quant_knob_sweep as qs
from autodeploy.kernels.quant_format import quantize_fp8
from autodeploy.kernels.triton_fp8_act_quant import quantize_rows_fp8
from autodeploy.kernels.triton_quant_fp8_linear import blockwise_scaled_mm, _scaled_mm

F8 = torch.float8_e4m3fn
def block_quant(w):
    n, k = w.shape
    b = w.float().reshape(n // 128, 128, k // 128, 128)
    s = b.abs().amax(dim=(1, 3)).clamp(min=1e-12) / 448.0  # [N/128, K/128]
    q = (b / s[:, None, :, None]).clamp(-448, 448).to(F8).reshape(n, k)
    return q, s

ROWS = sys.argv[sys.argv.index("--rows") + 1] if "--rows" in sys.argv else "64,8192"
for rows in map(int, ROWS.split(",")):
    for name, (n, k) in qs.SHAPES.items():
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
        f8 = quantize_fp8(w, True)
        qb, sb = block_quant(w)
        x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
        qg, sg = quantize_rows_fp8(x, 128)
        qt, st = quantize_rows_fp8(x, -1)
        sa = sg.float().t().contiguous().t()
        out = {}
        def blk(p):
            return torch._scaled_mm(qg, p[0].t(), scale_a=sa, scale_b=p[1].t(), out_dtype=torch.bfloat16)
        try:
            y = blk((qb, sb)).float()
            ref = (qg.float().reshape(rows, k // 128, 128) * sg[:, :, None]).reshape(rows, k) @ \
                  (qb.float().reshape(n // 128, 128, k // 128, 128) * sb[:, None, :, None]).reshape(n, k).t()
            err = ((y - ref).abs().max() / ref.abs().max()).item()
            out["blk128"] = f"{qs.timed(blk, (qb, sb)):.1f} (err {err:.1e})"
        except Exception as e:
            out["blk128"] = f"{type(e).__name__}: {str(e)[:200]}"
        out["vec128(now)"] = f"{qs.timed(lambda p: blockwise_scaled_mm(qg, sg, p[0], p[1], None, torch.bfloat16), f8):.1f}"
        out["rowwise"] = f"{qs.timed(lambda p: _scaled_mm(qt, st, p[0], p[1], None, torch.bfloat16), f8):.1f}"
        out["bf16"] = f"{qs.timed(lambda p: F.linear(x, p[0]), (w,)):.1f}"
        print(rows, name, " ".join(f"{a}={b}" for a, b in out.items()), flush=True)
