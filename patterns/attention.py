"""Recognise HF attention in both `sdpa` and `eager` form.

sdpa:  aten.scaled_dot_product_attention(q, repeat_kv(k), repeat_kv(v), mask, scale=...)
eager: matmul(q, repeat_kv(k).transpose(2, 3)) * scale [-> cap * tanh(. / cap)] [+ bias] + mask
       [masked_fill] -> softmax(-1, fp32) -> .to(q.dtype) -> dropout(p=0) -> matmul(., repeat_kv(v))
       (or the same with q/k/v flattened to [b * h, s, d]: baddbmm(bias, q, k^T, alpha=scale) and bmm, as Bloom;
       XGLM's bmm, its scores floored at the dtype's lowest value and viewed between [b, h, s, k] and [b * h, s, k];
       masks as masked_fill or where(keep, scores, constant), as GPT-Neo)

Attention sinks (one learned logit per head in every row's softmax denominator) come in two eager forms:
  GPT-OSS:     cat([scores, sinks.reshape(1, -1, 1, 1).expand(..., 1)], -1) [- its row max] -> softmax
               -> [..., :-1] -> @ v
  Granite SWA: (softmax(scores) @ v) * sigmoid(logsumexp(scores, -1) - sinks.view(1, -1, 1)).unsqueeze(-1)
               (exp(lse) / (exp(lse) + exp(sink)): the same denominator)
Both give the un-repeated k/v (GQA stays visible), the scale, the eager soft cap, the sinks, and the terms added
to the scores (masks and position biases; `patterns/position_bias.py` reads what they encode). A
boolean mask is not interpreted here: whether the attention is causal and which sliding window it has is
module-level knowledge the transform reads from the HF module (the where's conditions go along, for a module
that keeps its window only in a constant mask buffer).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch.fx import Node

from autodeploy.graph_utils import is_op

from .helpers import (VIEWS, advance, binary_operands, bind_args, is_last_dim, is_value_preserving, sole_user,
                      split_scalar, strip, val)

aten = torch.ops.aten


@dataclass
class AttentionMatch:
    output: Node  # [b, n_heads, s, d_v], HF's layout before the output transpose
    q: Node  # [b, n_heads, s, d]
    k: Node  # [b, n_kv_heads, s, d], repeat_kv stripped
    v: Node  # [b, n_kv_heads, s, d_v], repeat_kv stripped
    scale: float
    logit_cap: float | None  # from the graph: eager only (HF's sdpa path refuses soft caps)
    form: str  # "sdpa" or "eager"
    additive_terms: tuple[Node, ...] = ()  # added to the scores besides q k^T: masks, position biases
    sinks: Node | None = None  # [n_heads]: one logit per head in every row's softmax denominator
    kept_where: tuple[Node, ...] = ()  # boolean conditions of where(cond, scores, constant): True keeps a score


def strip_repeat_kv(node: Node) -> Node:
    """HF's repeat_kv: x[:, :, None].expand(b, h_kv, n_rep, s, d).reshape(b, h_kv * n_rep, s, d) -> x.

    Returns `node` unchanged when it is not a repeat (n_rep == 1 makes repeat_kv the identity).
    """
    reshape = strip(node)
    if not is_op(reshape, VIEWS):
        return node
    expand = strip(reshape.args[0])
    if not is_op(expand, aten.expand):
        return node
    unsqueeze = strip(expand.args[0])
    if not is_op(unsqueeze, aten.unsqueeze) or unsqueeze.args[1] != 2:
        return node
    source = unsqueeze.args[0]
    src, expanded, out = (val(n).shape for n in (source, expand, reshape))
    # Only the inserted dim 2 is expanded, and the reshape folds it into the head dim.
    is_repeat = (
        len(src) == 4
        and (expanded[:2], expanded[3:]) == (src[:2], src[2:])
        and (out[0], out[1], out[2:]) == (src[0], src[1] * expanded[2], src[2:])
    )
    return source if is_repeat else node


def _gqa_compatible(q: Node, k: Node, v: Node) -> bool:
    shapes = [val(n).shape for n in (q, k, v)]
    if any(len(s) != 4 for s in shapes):
        return False
    (_, n_heads, _, _), (_, n_kv, _, _), (_, n_kv_v, _, _) = shapes
    return n_kv == n_kv_v and n_heads % n_kv == 0


def match_sdpa(node: Node) -> AttentionMatch | None:
    """Anchor: aten.scaled_dot_product_attention without dropout, with a mask or is_causal."""
    if not is_op(node, aten.scaled_dot_product_attention):
        return None
    args = bind_args(node)
    if args["dropout_p"] != 0 or (args["attn_mask"] is None and not args["is_causal"]):
        return None
    q, k, v = args["query"], args["key"], args["value"]
    if not args["enable_gqa"]:
        k, v = strip_repeat_kv(k), strip_repeat_kv(v)
    if not _gqa_compatible(q, k, v):
        return None
    scale = args["scale"] if args["scale"] is not None else val(q).shape[-1] ** -0.5
    mask = args["attn_mask"]
    is_additive = isinstance(mask, Node) and val(mask) is not None and val(mask).is_floating_point()
    terms = tuple(_summands(mask)) if is_additive else ()
    return AttentionMatch(node, q, k, v, float(scale), None, "sdpa", terms)


def _as_division(node: Node) -> tuple[Node, float] | None:
    """x / c or x * c' (c = 1 / c') -> (x, c)."""
    split = split_scalar(node, (aten.div, aten.mul))
    if split is None or split[1] == 0:
        return None
    tensor, const = split
    return tensor, const if is_op(node, aten.div) else 1.0 / const


def _unflatten_heads(node: Node) -> Node | None:
    """x [b, h, s, d] from reshape(x, [b * h, s, d]) (Bloom's batched-matmul layout), else None."""
    node = strip(node)
    if not is_op(node, VIEWS):
        return None
    source, flat = node.args[0], val(node)
    shape = val(source).shape if val(source) is not None else ()
    if len(shape) != 4 or flat is None or flat.dim() != 3 or flat.shape[0] != shape[0] * shape[1]:
        return None
    return source


def _parse_product(node: Node) -> tuple[Node, Node, float, tuple[Node, ...]] | None:
    """q k^T as matmul(q, k^T) on [b, h, s, d], or bmm / baddbmm(bias, q, k^T, alpha=scale) on
    [b * h, s, d] viewed back to 4-D -> (q, repeated k, scale inside the product, bias terms)."""
    if is_op(node, aten.matmul):
        q, k_t, scale, terms = node.args[0], strip(node.args[1]), 1.0, ()
    else:
        if not is_op(node, VIEWS) or val(node).dim() != 4:
            return None
        product = strip(node.args[0])
        if is_op(product, aten.bmm):
            q3, k_t, scale, terms = product.args[0], strip(product.args[1]), 1.0, ()
        elif is_op(product, aten.baddbmm):
            args = bind_args(product)
            if args["beta"] != 1:
                return None
            q3, k_t, scale = args["batch1"], strip(args["batch2"]), float(args["alpha"])
            terms = tuple(_summands(args["self"]))
        else:
            return None
        q = _unflatten_heads(q3)
        if q is None or not is_op(k_t, aten.transpose):
            return None
        k = _unflatten_heads(k_t.args[0])
        return (q, k, scale, terms) if k is not None and {d % 3 for d in k_t.args[1:3]} == {1, 2} else None
    if not is_op(k_t, aten.transpose) or val(k_t) is None or val(k_t).dim() != 4:
        return None
    if {d % 4 for d in k_t.args[1:3]} != {2, 3}:
        return None
    return q, k_t.args[0], scale, terms


def _parse_scores(node: Node) -> tuple[Node, Node, float, float | None, tuple[Node, ...]] | None:
    """[cap * tanh(.../ cap)] of [scaled] q k^T -> (q, repeated k, scale, cap, bias terms)."""
    node = strip(node)
    cap = None
    capped = split_scalar(node, aten.mul)
    if capped is not None and is_op(strip(capped[0]), aten.tanh):
        divided = _as_division(strip(strip(capped[0]).args[0]))
        if divided is None or abs(divided[1] - capped[1]) > 1e-6 * abs(capped[1]):
            return None
        node, cap = strip(divided[0]), capped[1]
    scale = 1.0
    scaled = _as_division(node)
    if scaled is not None:
        node, scale = strip(scaled[0]), 1.0 / scaled[1]
    product = _parse_product(node)
    if product is None:
        return None
    q, k_rep, inner_scale, terms = product
    return q, k_rep, scale * inner_scale, cap, terms


def _summands(node: Node) -> list:
    """The operands of a tree of tensor additions (a + b + c -> [a, b, c])."""
    node = strip(node)
    if is_op(node, aten.add) and node.kwargs.get("alpha", 1) == 1 and all(isinstance(a, Node) for a in node.args):
        return _summands(node.args[0]) + _summands(node.args[1])
    return [node]


def _attend_values(probs: Node) -> tuple[Node, Node] | None:
    """probs @ v -> (output [b, h, s, d_v], repeated v), directly or through the [b * h, s, .] bmm of Bloom and
    XGLM (probs viewed there, through any views and inactive dropouts each read once)."""
    out = sole_user(probs)
    if out is not None and is_op(out, aten.matmul) and out.args[0] is probs:
        return out, out.args[1]
    while out is not None and (is_op(out, VIEWS) or is_value_preserving(out)) and out.args[0] is probs:
        probs, out = out, sole_user(out)
    bmm = out
    if bmm is None or not is_op(bmm, aten.bmm) or bmm.args[0] is not probs or val(probs).dim() != 3:
        return None
    output, v = sole_user(bmm), _unflatten_heads(bmm.args[1])
    if output is None or v is None or not is_op(output, (aten.view, aten.reshape)) or val(output).dim() != 4:
        return None
    return output, v


_SHAPE_OPS = (aten.expand, aten.unsqueeze, *VIEWS)


def _per_head_vector(node: Node, n_heads: int) -> Node | None:
    """The [n_heads] tensor that `node` ([..., n_heads, s_q, 1] or [b, n_heads, s_q]) broadcasts, one value per
    head (every other dim 1 before the broadcast), else None."""
    while isinstance(node, Node):
        shape = tuple(val(node).shape) if val(node) is not None else None
        if shape is None:
            return None
        if shape == (n_heads,):
            return node
        if not (is_value_preserving(node) or is_op(node, _SHAPE_OPS)):
            return None
        if not is_op(node, aten.expand) and sum(d != 1 for d in shape) > 1:
            return None  # only broadcasts may widen a per-head vector
        node = node.args[0]
    return None


def _without_row_max(logits: Node) -> Node:
    """x - max(x, -1, keepdim) -> x (the softmax does not see a per-row shift; GPT-OSS writes it)."""
    if not is_op(logits, aten.sub) or not isinstance(logits.args[1], Node) or val(logits.args[1]).shape[-1] != 1:
        return logits
    row_max = strip(logits.args[1])
    if row_max.target is operator.getitem and row_max.args[1] == 0:
        row_max = row_max.args[0]
    if not is_op(row_max, (aten.max, aten.amax)) or strip(row_max.args[0]) is not strip(logits.args[0]):
        return logits
    dims = row_max.args[1] if len(row_max.args) > 1 else None
    dims = [dims] if isinstance(dims, int) else dims
    return strip(logits.args[0]) if dims is not None and len(dims) == 1 and is_last_dim(dims[0], logits) else logits


def _sink_column_dropped(probs: Node) -> Node | None:
    """probs[..., :-1] (GPT-OSS drops the sink's column after the softmax): that slice, else None."""
    user = sole_user(probs)
    if user is None or not is_op(user, aten.slice) or user.args[0] is not probs:
        return None
    args = bind_args(user)
    width = val(probs).shape[-1]
    end = args["end"]
    if not is_last_dim(args["dim"], probs) or args["start"] not in (0, None) or args["step"] != 1:
        return None
    return user if end == -1 or (isinstance(end, int) and end == width - 1) else None


def _sink_concat(logits: Node, n_heads: int) -> tuple[Node, Node] | None:
    """cat([scores, sinks broadcast to [..., n_heads, s_q, 1]], -1) -> (scores, sinks [n_heads]), else None."""
    if not is_op(logits, aten.cat) or len(logits.args[0]) != 2:
        return None
    dim = logits.args[1] if len(logits.args) > 1 else 0
    scores, column = logits.args[0]
    if not is_last_dim(dim, logits) or val(column) is None or val(column).shape[-1] != 1:
        return None
    sinks = _per_head_vector(column, n_heads)
    return (strip(scores), sinks) if sinks is not None else None


def _lse_sink_scale(out: Node, logits: Node, n_heads: int) -> tuple[Node, Node] | None:
    """Granite SWA's out * sigmoid(logsumexp(logits, -1) - sinks).unsqueeze(-1) -> (that product, sinks)."""
    product = sole_user(out)
    operands = binary_operands(product, aten.mul) if product is not None else None
    if operands is None or out not in operands:
        return None
    scale = strip(operands[1] if operands[0] is out else operands[0])
    if not is_op(scale, aten.unsqueeze):
        return None
    sigmoid = strip(scale.args[0])
    difference = strip(sigmoid.args[0]) if is_op(sigmoid, aten.sigmoid) else None
    if difference is None or not is_op(difference, aten.sub):
        return None
    lse, sink_view = (strip(a) for a in difference.args[:2])
    if not (is_op(lse, aten.logsumexp) and strip(lse.args[0]) is logits and is_last_dim(lse.args[1][0], lse.args[0])):
        return None
    sinks = _per_head_vector(sink_view, n_heads)
    return (product, sinks) if sinks is not None else None


def _is_scalar(arg) -> bool:
    """A Python number or a one-element tensor (the constant a mask fills in)."""
    return not isinstance(arg, Node) or (val(arg) is not None and val(arg).numel() == 1)


def _is_lowest_floor(node: Node) -> bool:
    """max(x, c) for a constant c at or below float16's lowest value: nothing a finite score can fall under."""
    if not is_op(node, (aten.max, aten.maximum)) or len(node.args) != 2:
        return False
    floor = node.args[1]
    if isinstance(floor, Node) and is_op(floor, aten.full):
        floor = floor.args[1]
    return isinstance(floor, (int, float)) and floor <= torch.finfo(torch.float16).min


def match_eager(node: Node) -> AttentionMatch | None:
    """Anchor: softmax over the last dim of (scores + terms), optionally masked (masked_fill, or where with a
    constant), whose probabilities feed probs @ v.

    A mask (an added term or a masked_fill) is required: without one the attention is not causal,
    and the canonical op is.
    """
    if not is_op(node, (aten.softmax, aten._softmax)) or not is_last_dim(node.args[1], node):
        return None
    probs = advance(node)
    dropped = _sink_column_dropped(probs)
    attended = _attend_values(advance(dropped) if dropped is not None else probs)
    if attended is None:
        return None
    out, v_rep = attended
    logits, masked, sinks = _without_row_max(strip(node.args[0])), False, None
    n_heads = val(out).shape[1]
    if dropped is not None:
        concat = _sink_concat(logits, n_heads)
        if concat is None:
            return None
        logits, sinks = concat
    elif (scaled := _lse_sink_scale(out, logits, n_heads)) is not None:
        out, sinks = scaled
    masked_logits = logits
    logits, kept = _unmasked(masked_logits)
    summands = _summands(logits)
    for i, summand in enumerate(summands):
        scores, kept_here = _unmasked(summand) if isinstance(summand, Node) else (summand, ())
        parsed = _parse_scores(scores) if isinstance(scores, Node) else None
        if parsed is not None:
            q, k_rep, scale, cap, inner_terms = parsed
            k, v = strip_repeat_kv(k_rep), strip_repeat_kv(v_rep)
            has_mask = logits is not masked_logits or scores is not summand or len(summands) > 1
            if not has_mask or not _gqa_compatible(q, k, v):
                return None
            terms = tuple(inner_terms) + tuple(summands[:i] + summands[i + 1:])
            return AttentionMatch(out, q, k, v, scale, cap, "eager", terms, sinks, kept + kept_here)
    return None


def _unmasked(node: Node) -> tuple[Node, tuple[Node, ...]]:
    """Scores under masked_fill(scores, mask, c) or where(keep, scores, c) (c a constant; GPT-Neo's
    where(bias, scores, min)), a floor at the dtype's lowest value (XGLM's max(scores, min)), or a view between
    [b, h, s, k] and [b * h, s, k] -> (scores, the where's keep conditions)."""
    kept = ()
    while True:
        heads = _unflatten_heads(node) if val(node) is not None and val(node).dim() == 3 else None
        if heads is not None:
            node = strip(heads)
        elif _is_lowest_floor(node):
            node = strip(node.args[0])
        elif is_op(node, aten.masked_fill):
            node = strip(node.args[0])
        elif is_op(node, aten.where) and len(node.args) == 3 and isinstance(node.args[1], Node) \
                and _is_scalar(node.args[2]):
            node, kept = strip(node.args[1]), kept + (node.args[0],)
        else:
            return node, kept


def match_attention(node: Node) -> AttentionMatch | None:
    """Either form, anchored on its distinctive op (sdpa, or the softmax of eager attention)."""
    return match_sdpa(node) or match_eager(node)
