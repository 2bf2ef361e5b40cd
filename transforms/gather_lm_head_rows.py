"""gather_lm_head_rows: the LM head projects only the rows whose logits a step uses.

A prefill chunk of n tokens samples from its last token's logits, yet the exported graph runs every
token through the LM head: for a 2,048-token step of Llama-3.1-8B that is 2.2 TFLOP of a bf16 GEMM
(7 % of the step's FLOPs) and a 525 MB logits tensor, 2.1 GB at 8,192 tokens. This transform adds a
last graph input `logit_rows` (int64 [R], increasing rows of the packed tokens; R == T means all of
them) and takes those rows of the LM head's input, so the graph returns logits [1, R, vocab]. The
executor passes each sequence's last token for a step and every row for full logits (perplexity).
H200, Llama-3.1-8B (BENCHMARKS.md session 19): TTFT of a 4,096-token prompt -6 % (bf16 and FP8).

The LM head is the linear the graph output comes from through per-row ops only (casts, soft-capping,
scaling). Where that path holds anything else, or the head reads another per-token input (scales of
an activation quantized outside it), the graph is left as it was and the executor gathers the rows
from the full logits as before. Runs in the cache stage, on the packed interface of insert_kv_cache.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from autodeploy.graph_utils import is_op
from autodeploy.kernels.triton_backends import BACKENDS
from autodeploy.runtime.kv_cache import LOGIT_ROWS_KEY, kv_cache_of

from .registry import Stage, Transform, TransformContext, register

aten = torch.ops.aten
# every backend of the linear ops (select_backends ran before this stage), and the INT decode GEMVs
_LM_HEAD_OPS = (*(op for name in ("linear", "fp8_linear", "int_linear") for op in BACKENDS[name].values()),
                torch.ops.autodeploy.int_linear_gemv, torch.ops.autodeploy.int4_linear_tinygemm)
_PER_ROW_OPS = (aten.mul, aten.div, aten.add, aten.sub, aten.tanh, aten.clamp, aten._to_copy, aten.to)


def take_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Rows `rows` of x [..., T, H] along T; all of them (x itself, no copy) when there are T rows."""
    return x if rows.shape[0] == x.shape[-2] else x.index_select(-2, rows)


def _is_token_shaped(node: Node, tokens: str) -> bool:
    val = node.meta.get("val")
    return isinstance(val, torch.Tensor) and any(str(d) == tokens for d in val.shape)


def _lm_head(output: Node, tokens: str) -> Node | None:
    """The linear the output's logits come from through per-row ops, else None."""
    node = output.args[0]
    while isinstance(node, Node) and not is_op(node, _LM_HEAD_OPS):
        if not is_op(node, _PER_ROW_OPS):
            return None
        rows = [a for a in node.all_input_nodes if _is_token_shaped(a, tokens)]
        if len(rows) != 1:
            return None
        node = rows[0]
    if not isinstance(node, Node):
        return None
    activation = node.args[0]
    others = [a for a in node.all_input_nodes if a is not activation]
    if not _is_token_shaped(activation, tokens) or any(_is_token_shaped(a, tokens) for a in others):
        return None
    return node


@register
class GatherLmHeadRows(Transform):
    name = "gather_lm_head_rows"
    stage = Stage.CACHE

    def apply(self, gm: GraphModule, ctx: TransformContext) -> dict[str, int]:
        if kv_cache_of(gm) is None:  # the plain interface returns every token's logits
            return {"gathered_lm_head": 0}
        graph = gm.graph
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        input_ids = next(n for n in placeholders if n.target == "input_ids")
        tokens = str(input_ids.meta["val"].shape[-1])  # the exported token dimension's symbol
        head = _lm_head(next(n for n in graph.nodes if n.op == "output"), tokens)
        if head is None:  # expected() names it in the report: every token's logits are computed
            return {"gathered_lm_head": 0}
        with graph.inserting_after(placeholders[-1]):
            rows = graph.placeholder("logit_rows")
        with graph.inserting_before(head):
            taken = graph.call_function(take_rows, (head.args[0], rows))
        head.args = (taken, *head.args[1:])
        gm.meta[LOGIT_ROWS_KEY] = True
        return {"gathered_lm_head": 1}

    def expected(self, gm: GraphModule, ctx: TransformContext) -> dict[str, int]:
        return {"gathered_lm_head": int(kv_cache_of(gm) is not None)}
