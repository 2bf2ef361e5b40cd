"""use_int4_tinygemm: INT4 linears decode through PyTorch's tinygemm (kernels/int4_tinygemm.py).

On an H200, tinygemm runs the Llama-3.1-8B decode linears 2-4x faster than our Triton backend at two to
eight rows, but loses to our tensor-core dot at 16 and is 3x slower than dequantize + cuBLAS at 64. So every
`int_linear_triton` node with 4-bit codes whose weights tinygemm can take becomes `int4_linear_tinygemm`, which
runs our INT4 GEMV on its re-packed codes up to `gemv_rows` rows (kernels/triton_int_gemv.py; faster than
tinygemm at one row), tinygemm up to `max_rows` rows and past them what `int_linear_gemv` runs past its GEMV
(the dot up to 64 rows, then the Triton backend; rows are fixed per captured graph, so each CUDA graph takes one
path).

Memory: each kernel is the fastest only over its range of rows, so the tinygemm copy (packed codes + bf16
scales and zero offsets, ~0.5 byte per weight) is kept beside the codes the rest reads. With the GEMV, those
are its re-packed codes (+ float32 coefficients): past max_rows the dot reads them in place and the Triton
backend as the canonical packing of the weight with its columns permuted (`interleaved_columns`), gathering x's
columns, and our canonical codes are deleted; without it, our canonical codes. So an INT4 weight takes ~1 byte, not the ~1.5 of
three layouts. The report counts the new tensors' bytes (`tinygemm_bytes`, `gemv_bytes`); they are
parameters, so every weight-bytes figure includes them.

Runs after select_backends (it rewrites the Triton backend's nodes), on CUDA only: elsewhere it does
nothing. Works on whatever int_linear nodes exist: fused q/k/v and gate/up, one rank's shards.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
from torch.fx import GraphModule

from autodeploy.errors import RecipeError
from autodeploy.graph_utils import (add_weight_copy, attr_tensor, drop_parameter, graph_modules, is_op,
                                   replace_with_call)
from autodeploy.kernels.int4_tinygemm import ineligible, tinygemm_weights
from autodeploy.kernels.triton_int_gemv import MAX_ROWS, gemv_tensors, int_gemv_supported
from autodeploy.patterns.helpers import bind_args, val

from .registry import Stage, Transform, TransformConfig, TransformContext, register

INT_LINEAR_TRITON = torch.ops.autodeploy.int_linear_triton.default
TINYGEMM = torch.ops.autodeploy.int4_linear_tinygemm.default


@dataclass
class UseInt4TinygemmConfig(TransformConfig):
    max_rows: int = 8  # rows (tokens) up to which tinygemm runs; 0 = off. H200: it wins at 8, the dot at 16
    gemv_rows: int = 1  # rows up to which our GEMV runs (0 = no GEMV copy). H200: it wins at 1, loses at 2

    def __post_init__(self):
        if self.max_rows < 0:
            raise RecipeError(f"use_int4_tinygemm: max_rows must be >= 0, not {self.max_rows}")
        if not 0 <= self.gemv_rows <= MAX_ROWS:
            raise RecipeError(f"use_int4_tinygemm: gemv_rows must be 0 .. {MAX_ROWS}, not {self.gemv_rows}")


def rewrite_int4_linears(gm: GraphModule, max_rows: int, gemv_rows: int = 0) -> dict[str, int]:
    """Every eligible 4-bit int_linear_triton node of gm -> int4_linear_tinygemm, its tinygemm tensors (and with
    gemv_rows, the GEMV's, which replace our canonical codes) made on the weights' device. Counts: rewritten,
    tinygemm_bytes, gemv_bytes, skipped_<reason>."""
    counts: Counter = Counter(rewritten=0, tinygemm_bytes=0, gemv_bytes=0)
    for node in [n for n in gm.graph.nodes if is_op(n, INT_LINEAR_TRITON)]:
        args = bind_args(node)
        if args["bits"] != 4:
            continue
        qweight = attr_tensor(gm, args["qweight"])
        out = val(node)
        reason = ineligible(qweight.shape[0], qweight.shape[1] * 8, args["group_size"], args["g_idx"],
                            out.dtype if out is not None else None, qweight.device)
        if reason is not None:
            counts[f"skipped_{reason}"] += 1
            continue
        scales, zeros = attr_tensor(gm, args["scales"]), attr_tensor(gm, args["zeros"])
        packed, scales_and_zeros = tinygemm_weights(qweight, scales, zeros, args["group_size"])
        name = args["qweight"].target
        packed_node = add_weight_copy(gm, node, f"{name}_tinygemm", packed)
        sz_node = add_weight_copy(gm, node, f"{name}_tinygemm_scales_zeros", scales_and_zeros)
        codes, gemv = args["qweight"], ()
        if gemv_rows and int_gemv_supported(1, qweight.shape[1] * 8, args["group_size"], 4):
            tensors = gemv_tensors(qweight, scales, zeros, 4)
            words, coeffs, columns = (add_weight_copy(gm, node, f"{name}_{suffix}", t) for suffix, t in tensors.items())
            codes, gemv = words, (words, coeffs, gemv_rows, columns)
            counts["gemv_bytes"] += sum(t.numel() * t.element_size() for t in tensors.values())
        replace_with_call(gm, node, TINYGEMM, (args["x"], codes, args["scales"], args["zeros"], packed_node,
                                               sz_node, args["bias"], args["group_size"], max_rows, *gemv))
        gm.graph.erase_node(node)
        drop_parameter(gm, args["qweight"])  # the canonical codes, unless another node still reads them
        counts["rewritten"] += 1
        counts["tinygemm_bytes"] += sum(t.numel() * t.element_size() for t in (packed, scales_and_zeros))
    return dict(counts)


@register
class UseInt4Tinygemm(Transform):
    name = "use_int4_tinygemm"
    stage = Stage.FUSION
    config_cls = UseInt4TinygemmConfig

    def apply(self, gm: GraphModule, ctx: TransformContext) -> dict[str, int]:
        if ctx.device.type != "cuda" or self.config.max_rows == 0:
            return {"rewritten": 0}
        counts: Counter = Counter()
        for module in graph_modules(gm):
            counts.update(rewrite_int4_linears(module, self.config.max_rows, self.config.gemv_rows))
        return dict(counts)
