"""fuse_rope_attention: cached_attention(rope_pair(q, k, cos, sin)) -> cached_attention(q, k, ..., rope_cos=cos, ...).

At batch 1 a decode layer is a chain of short kernels, and RoPE is one of them (~1.2 us on an H200, a launch per
layer) between the QKV projection and the attention. The cached attention op takes cos / sin and rotates q and k
itself: the decode kernel rotates q where it loads it and the new k before it stores it in the cache
(kernels/triton_decode_attention.py), prefill rotates them in the op before its kernels. A pair is folded only where
the attention is the only reader of both rotated tensors (a partial rotary's slice-and-concat, or any other reader,
keeps the separate op). Runs after insert_kv_cache, on whichever backend that picked. H200, Llama-3.1-8B shape
(BENCHMARKS.md session 16): bf16 batch 1 +1.2 %; FP8 batch 1 and bf16 batch 64 unchanged.
"""

from __future__ import annotations

import operator

import torch
from torch.fx import GraphModule, Node

from autodeploy.graph_utils import is_op
from autodeploy.kernels.cached_attention import CACHED_ATTENTION_BACKENDS

from ._rewrite import rewrite_each
from .registry import Stage, Transform, TransformContext, register

PAIRS = (torch.ops.autodeploy.rope_pair.default, torch.ops.autodeploy.rope_pair_triton.default)


def _rotated_by(node: Node, index: int) -> Node | None:
    """The rope pair whose output `index` is `node`, when the attention is that output's only reader."""
    if not (node.op == "call_function" and node.target is operator.getitem and node.args[1] == index
            and len(node.users) == 1 and is_op(node.args[0], PAIRS)):
        return None
    return node.args[0]


def _fold(graph, attention: Node) -> bool:
    q, k = attention.args[0], attention.args[1]
    pair = _rotated_by(q, 0)
    if pair is None or _rotated_by(k, 1) is not pair or len(pair.users) != 2:
        return False
    if attention.kwargs.get("rope_cos") is not None:
        return False
    raw_q, raw_k, cos, sin, *rest = pair.args
    interleaved = rest[0] if rest else pair.kwargs.get("interleaved", False)
    attention.args = (raw_q, raw_k, *attention.args[2:])
    attention.kwargs = {**attention.kwargs, "rope_cos": cos, "rope_sin": sin, "rope_interleaved": interleaved}
    for node in (q, k, pair):
        graph.erase_node(node)
    return True


@register
class FuseRopeAttention(Transform):
    name = "fuse_rope_attention"
    stage = Stage.CACHE

    def apply(self, gm: GraphModule, ctx: TransformContext) -> dict[str, int]:
        return {"rope_in_attention": rewrite_each(gm, tuple(CACHED_ATTENTION_BACKENDS.values()), _fold)}
