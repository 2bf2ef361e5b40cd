"""Triton kernel for skinny linears (a few rows: decode at small batch), the `linear_triton` backend.

With one to a few rows, y = x @ W.T only streams W: the time is W's bytes over memory bandwidth.
cuBLAS reaches that for the large MLP matrices but loses 10-20 % on the smaller ones (q/k/v, o,
down) and adds a split-K reduce kernel. This kernel gives each program BLOCK_N output columns and
walks the whole of K (no split, no second kernel); the rows (padded to 16 for tl.dot) ride along
for free. Anything with more rows than SKINNY_ROWS goes to torch (cuBLAS), so prefill is unchanged.

The same kernel is the `gated_linear_triton` backend: with the constexpr GATED its input rows are
act(gate) * up, formed from the gate and up tiles as they load (two strided halves of the fused gate_up
output) and rounded to their dtype as `gated_act` rounds its output, so the activation costs no kernel
launch of its own. With the constexpr NORM (the `add_rms_norm_linear_triton` backend) its input rows are
RMSNorm(x + residual): the whole row, loaded once, gives its inverse RMS, then the K loop normalizes the tiles
as they load, rounded as the fused_add_rms_norm kernel rounds them (the same @triton.jit helpers), and program
0 stores x + residual, the next residual, so the norm costs no launch of its own. Every program recomputes the
prologue, so both take one row (PROLOGUE_ROWS), computed as a vector and placed in row 0 of the dot's tile:
computed on the whole padded [16, BLOCK_K] tile, the activation made the 8B down projection ~4x slower on an
H200 (2,472 against 536 SASS instructions per K step). More rows run the unfused kernels. Without GATED and
NORM the prologues are compiled out: the plain linear's code is unchanged.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .triton_activation import ACTIVATION_IDS, gated_product
from .triton_gated_act import gated_act
from .triton_layout import as_rows
from .triton_pdl import pdl_launch, prefetch_l2, wait_for_inputs
from .triton_rms_norm import fused_add_rms_norm, inverse_rms, rounded_sum, rounds_normed, weighted_normed

SKINNY_ROWS = 16
# The GATED / NORM prologues take one row (decode at batch 1): every program computes it again.
PROLOGUE_ROWS = 1
NORM_MAX_K = 16384  # NORM loads the whole row at once (one L2 trip) before its K loop
# From benchmarks/quant_knob_sweep.py on an H200 (BENCHMARKS.md): 32 x 256 tiles in 6 stages for the 4096-wide
# outputs (128 programs); wider ones (fused q/k/v, gate/up) stream faster with 64 weight rows as the MMA's A operand.
BLOCK_N = 32
BLOCK_K = 256
NUM_WARPS = 4
NUM_STAGES = 6
SWAP = False
WIDE_N = 4096
WIDE_KNOBS = dict(block_n=64, block_k=128, num_warps=4, num_stages=8, swap=True)
# With PDL: how many 512-column tiles of its weight rows each program asks L2 for before it waits for
# the previous kernel (BENCHMARKS.md: 2 of 2/4/6/8 was fastest).
PREFETCH_K = 512 * int(os.environ.get("AUTODEPLOY_PDL_PREFETCH", "2"))


@triton.jit
def _skinny_linear_kernel(
    x_ptr, up_ptr, w_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SWAP: tl.constexpr,
    GATED: tl.constexpr = False, ACTIVATION: tl.constexpr = 0, USE_PDL: tl.constexpr = False,
    PREFETCH_K: tl.constexpr = 0, residual_ptr=None, norm_weight_ptr=None, added_ptr=None, eps=None,
    NORM: tl.constexpr = False, ROUND_NORMED: tl.constexpr = False, NORM_BLOCK: tl.constexpr = 1,
):
    """y = x @ w.T (+ b); with GATED (one row), x is the gate and the row multiplied is act(x) * up (up_ptr;
    None without GATED); with NORM (one row) it is rms_norm(x + residual) * norm weight, and program 0 stores
    x + residual to added_ptr (the NORM-only arguments are None without NORM)."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    n_valid = offs_n < N
    m_valid = offs_m < M
    w_rows = w_ptr + tl.where(n_valid, offs_n, 0)[:, None].to(tl.int64) * stride_wn
    # Weights never depend on the previous kernel: pull the first tiles into L2 while it finishes.
    if PREFETCH_K > 0:  # one address per 128-byte line (2-byte weights)
        prefetch_l2(w_rows + tl.minimum(tl.arange(0, PREFETCH_K // 64)[None, :] * 64, K - 1))
    wait_for_inputs(USE_PDL)
    # GATED / NORM take one row (M == 1): the prologue runs on a [BLOCK_K] vector placed in row 0 of the tile, so
    # the padding rows of the dot cost it nothing (on the whole [16, BLOCK_K] tile the activation alone made
    # the down projection ~4x slower on an H200)
    if NORM:  # the row's inverse RMS before the first tile is normalized: the whole row in one load (one L2 trip)
        offs_row = tl.arange(0, NORM_BLOCK)
        added = rounded_sum(tl.load(x_ptr + offs_row, mask=offs_row < K, other=0.0),
                            tl.load(residual_ptr + offs_row, mask=offs_row < K, other=0.0)).to(tl.float32)
        rstd = inverse_rms(tl.sum(added * added, axis=0), K, eps)
        added_end = tl.where(tl.program_id(0) == 0, K, 0)  # program 0 stores the next residual
    if SWAP:  # weights as the MMA's A operand (M = BLOCK_N >= 64 takes Hopper's wgmma), rows as its N
        acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_valid = offs_k < K
        w = tl.load(w_rows + offs_k[None, :], mask=n_valid[:, None] & k_valid[None, :], other=0.0)
        if GATED or NORM:
            row = tl.load(x_ptr + offs_k, mask=k_valid, other=0.0)
            if GATED:
                row = gated_product(row, tl.load(up_ptr + offs_k, mask=k_valid, other=0.0), ACTIVATION).to(row.dtype)
            if NORM:  # the row as fused_add_rms_norm hands it on
                row = rounded_sum(row, tl.load(residual_ptr + offs_k, mask=k_valid, other=0.0))
                tl.store(added_ptr + offs_k, row, mask=offs_k < added_end)
                norm_weight = tl.load(norm_weight_ptr + offs_k, mask=k_valid, other=0.0)
                row = weighted_normed(row, rstd, norm_weight, ROUND_NORMED).to(row.dtype)
            x = tl.where(offs_m[:, None] == 0, row[None, :], 0.0).to(row.dtype)
        else:
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                        mask=m_valid[:, None] & k_valid[None, :], other=0.0)
        if SWAP:
            acc = tl.dot(w, tl.trans(x.to(w.dtype)), acc)
        else:
            acc = tl.dot(x.to(w.dtype), tl.trans(w), acc)
    if SWAP:
        acc = tl.trans(acc)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_valid, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=m_valid[:, None] & n_valid[None, :])


class NormPrologue(NamedTuple):
    """The NORM prologue's operands: the rows multiplied are fused_add_rms_norm(x, residual, weight, eps)[0],
    and x + residual is stored to `added` (contiguous, x's shape and dtype)."""

    residual: torch.Tensor
    weight: torch.Tensor
    eps: float
    added: torch.Tensor


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  block_n: int = BLOCK_N, block_k: int = BLOCK_K, num_warps: int = NUM_WARPS,
                  num_stages: int = NUM_STAGES, swap: bool = SWAP, up: torch.Tensor | None = None,
                  activation: str | None = None, norm: NormPrologue | None = None) -> torch.Tensor:
    """x [..., K] @ weight [N, K].T (+ bias), all rows of x in one tile (meant for a few: see `linear`).
    With `up` (x's shape and dtype) and `activation`, x is the gate and the rows multiplied are
    gated_act(x, up, activation); with `norm`, they are x's residual add + RMSNorm (NormPrologue).
    The knobs are for benchmarks/linear_bench.py, which sweeps them."""
    n, k = weight.shape
    x2 = as_rows(x)
    up2 = as_rows(up) if up is not None else None
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    rows = x2.shape[0]
    if (up is not None or norm is not None) and rows > PROLOGUE_ROWS:
        raise ValueError(f"the GATED / NORM prologues take {PROLOGUE_ROWS} row, not {rows}")
    y = torch.empty(rows, n, dtype=x.dtype, device=x.device)
    launch = pdl_launch(x.device)
    prefetch = min(triton.next_power_of_2(PREFETCH_K), triton.next_power_of_2(k)) if launch["USE_PDL"] else 0
    launch["PREFETCH_K"] = prefetch if prefetch >= 64 else 0
    if up2 is not None:
        launch.update(GATED=True, ACTIVATION=ACTIVATION_IDS[activation])
    if norm is not None:
        residual2 = as_rows(norm.residual)
        launch.update(residual_ptr=residual2, norm_weight_ptr=norm.weight.contiguous(), added_ptr=norm.added,
                      eps=norm.eps, NORM=True,
                      ROUND_NORMED=rounds_normed(x, norm.weight), NORM_BLOCK=triton.next_power_of_2(k))
    _skinny_linear_kernel[(triton.cdiv(n, block_n),)](
        x2, up2, weight, bias if bias is not None else weight, y, rows, n, k, x2.stride(0), weight.stride(0), y.stride(0),
        HAS_BIAS=bias is not None, BLOCK_M=max(16, triton.next_power_of_2(rows)), BLOCK_N=block_n, BLOCK_K=block_k,
        SWAP=swap, num_warps=num_warps, num_stages=num_stages, **launch,
    )
    return y.view(*x.shape[:-1], n)


def _fits_skinny(x: torch.Tensor, weight: torch.Tensor, max_rows: int = SKINNY_ROWS) -> bool:
    """Whether x's rows are few enough (1..max_rows) for the skinny kernel, of a half-precision linear on CUDA."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return 0 < rows <= max_rows and x.is_cuda and weight.dtype in (torch.bfloat16, torch.float16)


def _knobs(weight: torch.Tensor) -> dict:
    return WIDE_KNOBS if weight.shape[0] > WIDE_N else {}


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The backend: the skinny kernel for a few rows of a half-precision linear, else torch."""
    if _fits_skinny(x, weight):
        return skinny_linear(x, weight, bias, **_knobs(weight))
    return F.linear(x, weight, bias)


def gated_linear(gate: torch.Tensor, up: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 activation: str) -> torch.Tensor:
    """The gated_linear backend: the skinny kernel with the gated prologue for PROLOGUE_ROWS half-precision rows on
    CUDA (gate and up of one shape and dtype), else the gated_act backend and then `linear` (prefill: as unfused)."""
    if gate.shape == up.shape and gate.dtype == up.dtype and _fits_skinny(gate, weight, max_rows=PROLOGUE_ROWS):
        return skinny_linear(gate, weight, bias, up=up, activation=activation, **_knobs(weight))
    return linear(gated_act(gate, up, activation), weight, bias)


def add_rms_norm_linear(x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                        weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The add_rms_norm_linear backend: the skinny kernel with the NORM prologue for PROLOGUE_ROWS half-precision
    rows on CUDA (x and residual of one shape and dtype), else the fused_add_rms_norm kernel and then `linear`."""
    if (residual.shape == x.shape and residual.dtype == x.dtype == weight.dtype
            and _fits_skinny(x, weight, max_rows=PROLOGUE_ROWS)
            and weight.shape[1] <= NORM_MAX_K):
        added = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        norm = NormPrologue(residual, norm_weight, eps, added)
        return skinny_linear(x, weight, bias, norm=norm, **_knobs(weight)), added
    normed, added = fused_add_rms_norm(x, residual, norm_weight, eps)
    return linear(normed, weight, bias), added
