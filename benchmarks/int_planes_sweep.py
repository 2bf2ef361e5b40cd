"""A candidate for INT4 / INT8 weight-only linears at 5-64 rows (decode batches), measured against what runs them
now: the code-plane dot. On an H200 (BENCHMARKS.md session 12) INT8 and INT4 decode at batch 64 ran at half of
bf16's speed: past 16 rows the Triton backend dequantizes the whole weight to bf16 for cuBLAS every call, and its
skinny dot (5-16 rows) is slower still, its unpacked [N, words, codes] tile reshaped to [N, K] through shared
memory. The plane dot never reshapes: the order of K inside a dot does not matter as long as x follows it, so
each K step loads a [BLOCK_N, BLOCK_W] tile of packed words and runs one tl.dot per code slot j (32 / bits of
them) on the slot's codes, dequantized elementwise in the words' layout, against x's columns w * (32 / bits) + j
(a strided load of the small x). Our canonical layout, any whole-word group; or the GEMV's re-packed codes
(kernels/triton_int_gemv.py, what int_linear_gemv stores), where slot j of 4 consecutive words holds 4
consecutive columns, so x's loads come in runs of 4 (SASS for sm_90 of the canonical form: 2-byte x loads,
each stored to shared memory for the MMA).

On a GPU: us per call for each shape at 16 and 64 rows, weights colder than L2 (quant_knob_sweep.py's timing),
the best knob sets of the plane dot (canonical and re-packed codes) against the Triton backend (`int_linear_triton`: skinny dot up to 16 rows,
dequantize + cuBLAS beyond) and bf16 cuBLAS; every knob set is checked against the int_linear reference first.
--cpu: the reference check only, in Triton's interpreter, on small odd shapes (no timing).
Usage: python3 benchmarks/int_planes_sweep.py [--cpu]"""

import os
import sys

if "--cpu" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton.jit decorates the kernel

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

import autodeploy.kernels  # noqa: F401  (registers the reference ops)
from autodeploy.kernels.quant_format import quantize_int
from autodeploy.kernels.triton_int_gemv import interleave_codes

SCHEMES = {"int4 g128": (4, 128), "int8 per channel": (8, -1)}
KNOBS = [(16, 64, 32, 4, 3), (16, 128, 32, 4, 3), (16, 64, 64, 4, 3), (64, 64, 32, 4, 3), (64, 128, 32, 4, 3),
         (64, 128, 64, 8, 3), (64, 64, 64, 4, 4), (64, 256, 32, 8, 3)]  # (block_m, block_n, block_w, warps, stages)


@triton.jit
def _plane_dot_kernel(x_ptr, q_ptr, s_ptr, z_ptr, y_ptr, M, N, K, stride_xm, stride_qn, stride_sn, stride_ym,
                      BITS: tl.constexpr, GROUP_WORDS: tl.constexpr, HAS_ZEROS: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr, INTERLEAVED: tl.constexpr):
    PER_WORD: tl.constexpr = 32 // BITS
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    n_valid, m_valid = offs_n < N, offs_m < M
    rows = tl.where(n_valid, offs_n, 0).to(tl.int64)[:, None]
    words_per_row = K // PER_WORD
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for w0 in range(0, words_per_row, BLOCK_W):
        offs_w = w0 + tl.arange(0, BLOCK_W)
        w_valid = offs_w < words_per_row
        mask = n_valid[:, None] & w_valid[None, :]
        words = tl.load(q_ptr + rows * stride_qn + offs_w[None, :], mask=mask, other=0).to(tl.uint32, bitcast=True)
        group = offs_w // GROUP_WORDS if GROUP_WORDS > 0 else offs_w * 0
        scale = tl.load(s_ptr + rows * stride_sn + group[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_ZEROS:
            zero = tl.load(z_ptr + rows * stride_sn + group[None, :], mask=mask, other=0.0).to(tl.float32)
        else:
            zero = tl.full([BLOCK_N, BLOCK_W], 2.0 ** (BITS - 1), tl.float32)
        offset = -zero * scale
        for j in tl.static_range(PER_WORD):
            # (code | 2**23 as float32) - 2**23 is the code exactly; then (code - zero) * scale in one FMA
            code = (((words >> (j * BITS)) & ((1 << BITS) - 1)) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
            w = (code * scale + offset).to(x_ptr.dtype.element_ty)
            if INTERLEAVED:  # word 4b + i holds column 4 * PER_WORD * b + 4j + i in slot j
                cols = (offs_w // 4) * (4 * PER_WORD) + 4 * j + offs_w % 4
            else:
                cols = offs_w * PER_WORD + j
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + cols[None, :], mask=m_valid[:, None] & w_valid[None, :],
                        other=0.0)
            acc = tl.dot(x, tl.trans(w), acc)
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=m_valid[:, None] & n_valid[None, :])


def plane_dot(x, qweight, scales, zeros, bits, group_size, block_m, block_n, block_w, num_warps, num_stages,
              interleaved=False):
    """x [M, K] @ dequantize(qweight).T for our canonical layout (no act-order), or for the GEMV's re-packed codes
    of it (`interleaved`; block_w a multiple of 4)."""
    m, k = x.shape
    n = qweight.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(n, block_n), triton.cdiv(m, block_m))
    _plane_dot_kernel[grid](
        x, qweight, scales, zeros if zeros is not None else scales, y, m, n, k, x.stride(0), qweight.stride(0),
        scales.stride(0), y.stride(0), BITS=bits, GROUP_WORDS=0 if group_size == -1 else group_size * bits // 32,
        HAS_ZEROS=zeros is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_W=block_w, INTERLEAVED=interleaved,
        num_warps=num_warps, num_stages=num_stages)
    return y


def error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()


def check_on_cpu() -> int:
    """Odd shapes, both schemes, symmetric and not, a few knob sets: the plane dot against the reference."""
    g = torch.Generator().manual_seed(0)
    failed = 0
    for (n, k, rows), (bits, group), symmetric in [((40, 512, 3), (4, 128), False), ((33, 272, 5), (8, -1), True),
                                                   ((24, 384, 17), (4, 64), True), ((40, 320, 2), (8, 32), False)]:
        qweight, scales, zeros = quantize_int(torch.randn(n, k, generator=g), bits, group, symmetric)
        x = torch.randn(rows, k, generator=g)
        want = torch.ops.autodeploy.int_linear(x, qweight, scales, zeros, None, None, bits, group)
        for knobs, interleaved in (((16, 16, 16, 1, 1), False), ((16, 32, 32, 1, 1), False), ((16, 16, 16, 1, 1), True)):
            codes = interleave_codes(qweight, bits) if interleaved else qweight
            err = error(plane_dot(x, codes, scales, zeros, bits, group, *knobs, interleaved), want)
            failed += not err < 1e-5
            print(f"  {n}x{k} rows {rows} int{bits} group {group} {knobs} re-packed {interleaved}: error {err:.2e}",
                  flush=True)
    print("all agree" if not failed else f"{failed} WRONG", flush=True)
    return 1 if failed else 0


def main() -> int:
    if "--cpu" in sys.argv:
        return check_on_cpu()
    from quant_knob_sweep import SHAPES, sweep, timed

    torch.manual_seed(0)
    for scheme, (bits, group) in SCHEMES.items():
        for name, (n, k) in SHAPES.items():
            w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
            q = quantize_int(w, bits, group, False)
            repacked = (interleave_codes(q[0], bits), *q[1:])
            print(f"{scheme} {name} {n}x{k}", flush=True)
            for rows in (16, 64):
                x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
                ref = torch.ops.autodeploy.int_linear(x, *q, None, None, bits, group).float()
                backend = timed(lambda p: torch.ops.autodeploy.int_linear_triton(x, *p, None, None, bits, group), q)
                bf16 = timed(lambda p: F.linear(x, p[0]), (w,))
                print(f"  rows {rows}: backend {backend:.1f} us, bf16 {bf16:.1f} us", flush=True)
                sweep(f"plane {rows}", lambda p, *kn: plane_dot(x, *p, bits, group, *kn), q, KNOBS, ref)
                sweep(f"re-packed {rows}", lambda p, *kn: plane_dot(x, *p, bits, group, *kn, True), repacked, KNOBS, ref)
    return 0


if __name__ == "__main__":
    sys.exit(main())
