"""`autodeploy::int_linear_gemv`: INT4 / INT8 weight-only linears kept only in the interleaved GEMV's layout.

`use_int_gemv` re-packs an `int_linear_triton` node's codes for the GEMV (kernels/triton_int_gemv.py) and
rewrites it to this op: up to `gemv_rows` rows the GEMV reads them; more rows up to DOT_ROWS (decode batches, on
CUDA) the tensor-core dot (kernels/triton_int_dot.py) reads them in place; beyond (prefill) the Triton backend
reads the same words as canonical ones, which they are for the weight with its columns in `interleaved_columns`
order, so x's columns are gathered into that order first (one small copy of the activations; the weight is stored
once). The INT4 linears tinygemm takes run the same GEMV inside
`int4_linear_tinygemm` (use_int4_tinygemm); this op is for the others: INT8 (which on the canonical-layout
GEMV decoded slower than bf16 on an H200) and INT4 that tinygemm refuses.
"""

from __future__ import annotations

import torch

from .triton_int_dot import DOT_ROWS, int_dot_linear, int_dot_supported
from .triton_int_gemv import int_gemv

SCHEMA = ("(Tensor x, Tensor words, Tensor coeffs, Tensor columns, Tensor scales, Tensor? zeros, Tensor? bias=None, "
          "int bits=8, int group_size=-1, int gemv_rows=4) -> Tensor")


@torch.library.custom_op("autodeploy::int_linear_gemv", mutates_args=(), schema=SCHEMA)
def int_linear_gemv(
    x: torch.Tensor,
    words: torch.Tensor,
    coeffs: torch.Tensor,
    columns: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bias: torch.Tensor | None = None,
    bits: int = 8,
    group_size: int = -1,
    gemv_rows: int = 4,
) -> torch.Tensor:
    """int_linear of the weight whose interleaved codes are `words` (coefficients `coeffs`; `columns` their
    canonical reading's column order): the GEMV up to gemv_rows rows, else the Triton backend on x's columns in
    that order."""
    k = x.shape[-1]
    rows = x.numel() // k if k else 0
    if 0 < rows <= gemv_rows:
        return int_gemv(x, words, coeffs, bias, group_size, bits)
    return interleaved_int_linear(x, words, columns, scales, zeros, bias, bits, group_size)


def interleaved_int_linear(x: torch.Tensor, words: torch.Tensor, columns: torch.Tensor, scales: torch.Tensor,
                           zeros: torch.Tensor | None, bias: torch.Tensor | None, bits: int,
                           group_size: int) -> torch.Tensor:
    """int_linear of the GEMV's re-packed `words` past the GEMV's rows: the tensor-core dot up to DOT_ROWS rows on
    CUDA, else the Triton backend on x's columns gathered into `columns` order."""
    k = x.shape[-1]
    rows = x.numel() // k if k else 0
    if x.is_cuda and 0 < rows <= DOT_ROWS and int_dot_supported(k, bits, group_size):
        return int_dot_linear(x, words, scales, zeros, bias, bits, group_size, interleaved=True)
    return torch.ops.autodeploy.int_linear_triton(x.index_select(-1, columns), words, scales, zeros, None, bias, bits,
                                                  group_size)


@int_linear_gemv.register_fake
def _(x, words, coeffs, columns, scales, zeros, bias=None, bits=8, group_size=-1, gemv_rows=4):
    torch._check(tuple(coeffs.shape) == (*scales.shape, 2) and tuple(columns.shape) == (x.shape[-1],),
                 lambda: "coeffs must be [N, G, 2] and columns [K]")
    return torch.ops.autodeploy.int_linear(x, words, scales, zeros, None, bias, bits, group_size)
