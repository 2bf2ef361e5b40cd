"""cleanup_noops: drop ops that return their input unchanged (reshapes to the same shape, casts to
the same dtype, contiguous on a contiguous tensor, alias).

Export keeps what HF code wrote: `.to(torch.float32)` on a float32 tensor, `.contiguous()`, the
alias before lm_head. Each is a node the backends would launch or copy for and an extra reader that
hides structure from later fusions (in float32 exports the residual reaches the next layer through
such a cast). A node is dropped only where its FakeTensor proves the no-op, and not when it feeds
or follows an in-place op, where the copy might be what keeps two tensors apart.
"""

from __future__ import annotations

import torch
from torch._prims_common import is_contiguous_or_false
from torch.fx import GraphModule, Node
from torch.fx.experimental.symbolic_shapes import statically_known_true

from autodeploy.graph_utils import graph_modules, is_op
from autodeploy.patterns.helpers import val

from .registry import Stage, Transform, TransformContext, register

aten = torch.ops.aten
_KINDS = {
    "view": (aten.view.default, aten.reshape.default, aten._unsafe_view.default),
    "cast": (aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten._to_copy.default, aten.type_as.default),
    "contiguous": (aten.contiguous.default,),
    "alias": (aten.alias.default,),
}


def _same_shape(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dim() == b.dim() and all(statically_known_true(x == y) for x, y in zip(a.shape, b.shape))


def _preserves_format(node: Node) -> bool:
    return node.kwargs.get("memory_format", torch.preserve_format) in (torch.preserve_format, None)


def _is_noop(node: Node, kind: str) -> bool:
    src, out = val(node.args[0]), val(node)
    if not isinstance(src, torch.Tensor) or not isinstance(out, torch.Tensor):
        return False
    if kind == "alias":
        return True
    if kind == "contiguous":
        return _preserves_format(node) and is_contiguous_or_false(src)
    if not _same_shape(src, out) or src.dtype != out.dtype:
        return False
    return kind == "view" or (src.device == out.device and _preserves_format(node))


def _near_mutation(node: Node) -> bool:
    def mutates(n: Node) -> bool:
        schema = getattr(n.target, "_schema", None)
        return schema is not None and schema.is_mutable

    return any(mutates(u) for u in (*node.users, *node.args[0].users))


@register
class CleanupNoops(Transform):
    name = "cleanup_noops"
    stage = Stage.FUSION

    def apply(self, gm: GraphModule, ctx: TransformContext) -> dict[str, int]:
        counts = dict.fromkeys(_KINDS, 0)
        for module in graph_modules(gm):
            for node in list(module.graph.nodes):
                kind = next((k for k, ops in _KINDS.items() if is_op(node, ops)), None)
                if kind is not None and isinstance(node.args[0], Node) and _is_noop(node, kind) and not _near_mutation(node):
                    node.replace_all_uses_with(node.args[0])
                    module.graph.erase_node(node)
                    counts[kind] += 1
        return counts
