"""fuse_attention_quant_fp8: the FP8 o projection's input quantized in the attention's epilogue.

After fuse_fp8_act_quant an FP8 W8A8 layer quantizes the attention output in a kernel of its own:
    a = cached_attention(...);  x = a.transpose(1, 2).reshape(1, T, -1);  q, s = quantize_fp8_per_token(x, g)
With per-token groups of one head each (g == the value head dim: Llama's 128 with the default
act_group_size), the decode kernel holds every group whole where it stores the output, so the three
become one op (kernels/cached_attention_quant.py) that returns (q, s) itself: one launch fewer per layer at
decode (the quantize kernel: H200, 8B shape, ~1.3 us at batch 1, ~1.8 us at batch 64). Prefill and mixed steps
quantize after the attention as before. Static input scales and other group sizes keep the separate op.
Runs in the cache stage, after fuse_rope_attention, on whichever attention backend insert_kv_cache picked.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from autodeploy.graph_utils import inherit_meta, is_op
from autodeploy.kernels.cached_attention_quant import QUANTIZING_BACKENDS
from autodeploy.kernels.triton_backends import BACKENDS
from autodeploy.patterns.helpers import bind_args

from ._rewrite import rewrite_each
from .registry import Stage, Transform, TransformContext, register

aten = torch.ops.aten
QUANTIZE = tuple(BACKENDS["quantize_fp8_per_token"].values())  # select_backends ran before this stage
_VIEWS = (aten.reshape.default, aten.view.default, aten.contiguous.default)


def _only_user(node: Node) -> bool:
    return len(node.users) == 1


def _attention_of(x: Node) -> tuple[Node, list[Node]] | None:
    """The cached attention whose output x is, as [1, T, heads * d] through transpose(1, 2) and views each read by
    nothing else, with those nodes (last first); else None."""
    chain = []
    while is_op(x, _VIEWS) and _only_user(x):
        chain.append(x)
        x = x.args[0]
    if not (is_op(x, aten.transpose.int) and sorted(x.args[1:]) == [1, 2] and _only_user(x)):
        return None
    chain.append(x)
    attention = x.args[0]
    if not (isinstance(attention, Node) and is_op(attention, tuple(QUANTIZING_BACKENDS)) and _only_user(attention)):
        return None
    return attention, chain


def _fuse(graph, quantize: Node) -> bool:
    args = bind_args(quantize)
    if args["input_scale"] is not None or not isinstance(args["x"], Node):
        return False
    found = _attention_of(args["x"])
    if found is None:
        return False
    attention, chain = found
    v = attention.args[2].meta.get("val")
    if v is None or v.shape[-1] != args["group_size"]:
        return False
    with graph.inserting_before(quantize):
        fused = graph.call_function(QUANTIZING_BACKENDS[attention.target], attention.args,
                                    {**attention.kwargs, "group_size": args["group_size"]})
    inherit_meta(fused, quantize, with_val=True)
    quantize.replace_all_uses_with(fused)
    for node in [quantize, *chain, attention]:
        graph.erase_node(node)
    return True


@register
class FuseAttentionQuantFp8(Transform):
    name = "fuse_attention_quant_fp8"
    stage = Stage.CACHE

    def apply(self, gm: GraphModule, ctx: TransformContext) -> dict[str, int]:
        return {"attention_quant": rewrite_each(gm, QUANTIZE, _fuse)}
