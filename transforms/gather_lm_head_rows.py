"""gather_lm_head_rows: the LM head projects only the rows whose logits a step uses.

A prefill chunk of n tokens samples from its last token's logits, yet the exported graph runs every
token through the LM head: for a 2,048-token step of Llama-3.1-8B that is 2.2 TFLOP of a bf16 GEMM
(7 % of the step's FLOPs) and a 525 MB logits tensor, 2.1 GB at 8,192 tokens. This transform adds a
last graph input `logit_rows` (int64 [R], increasing rows of the packed tokens; R == T means all of
them) and takes those rows of the LM head's input, so the graph returns logits [1, R, vocab]. The
executor passes each sequence's last token for a step and every row for full logits (perplexity).
H200, Llama-3.1-8B (BENCHMARKS.md session 19): TTFT of a 4,096-token prompt -6 % (bf16 and FP8).

The LM head is the linear the graph output comes from through per-row ops only (casts, soft-capping,
scaling, a vocab-parallel head's all_gather: every rank takes the same rows). An FP8 head reads its input quantized (e4m3 and per-token scales) from the final RMSNorm's
kernel: then the rows are taken of that norm's inputs, so it too computes only them. Where the path
holds anything else, the graph is left as it was (the report says so) and the executor gathers the
rows from the full logits as before. Runs in the cache stage, on the packed interface of insert_kv_cache.
"""

from __future__ import annotations

import operator

import torch
from torch.fx import GraphModule, Node

from autodeploy.graph_utils import is_op
from autodeploy.kernels.triton_backends import BACKENDS
from autodeploy.runtime.kv_cache import LOGIT_ROWS_KEY, kv_cache_of

from .registry import Stage, Transform, TransformContext, register

aten = torch.ops.aten


def _backends(*names: str) -> tuple:
    """Every backend of these canonical ops (select_backends ran before this stage)."""
    return tuple(op for name in names for op in BACKENDS[name].values())


_LM_HEAD_OPS = (*_backends("linear", "fp8_linear", "int_linear", "fp8_linear_quantized_input"),
                torch.ops.autodeploy.int_linear_gemv, torch.ops.autodeploy.int4_linear_tinygemm)
_PER_ROW_OPS = (aten.mul, aten.div, aten.add, aten.sub, aten.tanh, aten.clamp, aten._to_copy, aten.to)
# ops whose every output row is made of the same input row alone: a quantized head's input comes from one
_ROW_WISE_PRODUCERS = _backends("rms_norm", "fused_add_rms_norm", "fused_add_rms_norm_quant_fp8",
                                "quantize_fp8_per_token")


def take_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Rows `rows` of x [..., T, H] along T; all of them (x itself, no copy) when there are T rows."""
    return x if rows.shape[0] == x.shape[-2] else x.index_select(-2, rows)


def _is_token_shaped(node: Node, tokens: str) -> bool:
    val = node.meta.get("val")
    return isinstance(val, torch.Tensor) and any(str(d) == tokens for d in val.shape)


def _per_row(node: Node) -> bool:
    """Elementwise, or a vocab-parallel head's all_gather of the ranks' logits along the last dim."""
    if is_op(node, torch.ops.autodeploy.all_gather):
        dim, val = node.args[1], node.meta.get("val")
        return isinstance(val, torch.Tensor) and dim in (-1, val.dim() - 1)
    return is_op(node, _PER_ROW_OPS)


def _lm_head(output: Node, tokens: str) -> Node | None:
    """The linear the output's logits come from through per-row ops, else None."""
    node = output.args[0]
    while isinstance(node, Node) and not is_op(node, _LM_HEAD_OPS):
        if not _per_row(node):
            return None
        rows = [a for a in node.all_input_nodes if _is_token_shaped(a, tokens)]
        if len(rows) != 1:
            return None
        node = rows[0]
    return node if isinstance(node, Node) else None


def _rows_to_take(head: Node, tokens: str) -> tuple[Node, list[Node]] | None:
    """(node, its token-shaped inputs) such that taking rows of those inputs makes the head compute only them: the
    head and its activation, or the row-wise op (an RMSNorm quantizing for an FP8 head) whose outputs only the head
    reads, and that op's inputs. None when the head reads per-token tensors of another origin."""
    inputs = [a for a in head.all_input_nodes if _is_token_shaped(a, tokens)]
    if inputs == [head.args[0]]:
        return head, inputs
    producers = {a.args[0] for a in inputs if a.op == "call_function" and a.target is operator.getitem}
    if len(producers) != 1 or not all(a.target is operator.getitem for a in inputs):
        return None
    (producer,) = producers
    if not is_op(producer, _ROW_WISE_PRODUCERS) or any(set(out.users) - {head} for out in producer.users):
        return None
    return producer, [a for a in producer.all_input_nodes if _is_token_shaped(a, tokens)]


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
        found = _rows_to_take(head, tokens) if head is not None else None
        if found is None:  # expected() names it in the report: every token's logits are computed
            return {"gathered_lm_head": 0}
        reader, inputs = found
        with graph.inserting_after(placeholders[-1]):
            rows = graph.placeholder("logit_rows")
        for x in inputs:
            with graph.inserting_before(reader):
                reader.replace_input_with(x, graph.call_function(take_rows, (x, rows)))
        gm.meta[LOGIT_ROWS_KEY] = True
        return {"gathered_lm_head": 1}

    def expected(self, gm: GraphModule, ctx: TransformContext) -> dict[str, int]:
        return {"gathered_lm_head": int(kv_cache_of(gm) is not None)}
