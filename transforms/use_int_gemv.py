"""use_int_gemv: INT8 (and INT4 that tinygemm refuses) linears decode through the interleaved GEMV.

On the canonical layout the few-row GEMV converts its unpacked tile between register layouts every K step
(kernels/triton_int_gemv.py says why): on an H200 the Llama-3.1-8B shape decoded INT8 per channel at 188 tok/s
against bf16's 233. So every `int_linear_triton` node the GEMV takes (4 or 8 bits, no act-order, K and groups
in whole blocks of 4 words) has its codes re-packed for it, with float32 group coefficients, and becomes
`int_linear_gemv`: the GEMV up to `rows` rows (2), then the tensor-core dot up to 64 rows, then the Triton backend,
both reading the same words (the backend with x's columns gathered into their order; kernels/int_gemv_linear.py). The canonical codes are deleted: the weight is
stored once (the coefficients add 8 bytes per group, the column order 8 bytes per input column).

Runs after use_int4_tinygemm (which takes the INT4 linears tinygemm can run, with the same GEMV inside), on
CUDA only: elsewhere the Triton backend would only be interpreted.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
from torch.fx import GraphModule

from autodeploy.errors import RecipeError
from autodeploy.graph_utils import (add_weight_copy, attr_tensor, drop_parameter, graph_modules, is_op,
                                   replace_with_call)
from autodeploy.kernels.triton_int_gemv import MAX_ROWS, gemv_tensors, int_gemv_supported
from autodeploy.patterns.helpers import bind_args

from .registry import Stage, Transform, TransformConfig, TransformContext, register

INT_LINEAR_TRITON = torch.ops.autodeploy.int_linear_triton.default
INT_LINEAR_GEMV = torch.ops.autodeploy.int_linear_gemv.default


@dataclass
class UseIntGemvConfig(TransformConfig):
    # rows up to which the GEMV runs (0 = off), then the tensor-core dot. H200, INT8 per channel, the 8B layer's
    # four linears (benchmarks/int8_gemv_bench.py, BENCHMARKS.md session 15): GEMV 63.1 / 90.5 / 130.3 us at 1 / 2 /
    # 3 rows, the dot 110.1 / 110.9 / 111.2
    rows: int = 2

    def __post_init__(self):
        if not 0 <= self.rows <= MAX_ROWS:
            raise RecipeError(f"use_int_gemv: rows must be 0 .. {MAX_ROWS}, not {self.rows}")


def rewrite_int_linears(gm: GraphModule, rows: int) -> dict[str, int]:
    """Every int_linear_triton node of gm the GEMV takes -> int_linear_gemv, its codes re-packed on the weights'
    device (the canonical ones deleted). Counts: rewritten, gemv_bytes (what the new tensors take),
    skipped_act_order, skipped_shape."""
    counts: Counter = Counter(rewritten=0, gemv_bytes=0)
    for node in [n for n in gm.graph.nodes if is_op(n, INT_LINEAR_TRITON)]:
        args = bind_args(node)
        bits, group_size = args["bits"], args["group_size"]
        if args["g_idx"] is not None:
            counts["skipped_act_order"] += 1
            continue
        qweight = attr_tensor(gm, args["qweight"])
        if not int_gemv_supported(1, qweight.shape[1] * 32 // bits, group_size, bits):
            counts["skipped_shape"] += 1
            continue
        scales, zeros = attr_tensor(gm, args["scales"]), attr_tensor(gm, args["zeros"])
        name = args["qweight"].target
        tensors = gemv_tensors(qweight, scales, zeros, bits)
        words, coeffs, columns = (add_weight_copy(gm, node, f"{name}_{suffix}", t) for suffix, t in tensors.items())
        replace_with_call(gm, node, INT_LINEAR_GEMV, (args["x"], words, coeffs, columns, args["scales"], args["zeros"],
                                                      args["bias"], bits, group_size, rows))
        gm.graph.erase_node(node)
        drop_parameter(gm, args["qweight"])  # the canonical codes, unless another node still reads them
        counts["rewritten"] += 1
        counts["gemv_bytes"] += sum(t.numel() * t.element_size() for t in tensors.values())
    return dict(counts)


@register
class UseIntGemv(Transform):
    name = "use_int_gemv"
    stage = Stage.FUSION
    config_cls = UseIntGemvConfig

    def apply(self, gm: GraphModule, ctx: TransformContext) -> dict[str, int]:
        if ctx.device.type != "cuda" or self.config.rows == 0:
            return {"rewritten": 0}
        counts: Counter = Counter()
        for module in graph_modules(gm):
            counts.update(rewrite_int_linears(module, self.config.rows))
        return dict(counts)
