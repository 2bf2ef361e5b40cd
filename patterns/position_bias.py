"""Read what an attention's additive score terms encode: nothing beyond the mask, or ALiBi slopes.

HF adds masks and position biases to the attention scores in many shapes (Bloom: slope * key
position through baddbmm's input; MPT: a precomputed slope * (key - max_len) table sliced per step;
sdpa models: a float mask that may carry the bias). Rather than recognising each model's code, the
terms are *evaluated*: their producing subgraph runs on the CPU for a short example sequence (the
graph's placeholders get example inputs; everything they depend on must be computable without
weights). The matcher splits sums into their terms, so a bias added to a mask built from an input
is still seen. Where the sum of the evaluable terms is finite (the allowed keys), it must be slope_h * key position plus a
per-row constant, which softmax ignores: that is ALiBi with slopes [n_heads]. All-zero means a plain
mask. Terms that cannot be evaluated are treated as masks (what the canonical op's causal mask and
sliding window already express), unless they are computed from the model's parameters: a learned bias (Inkling's
relative position logits from a projection of the hidden states) is reported as unsupported, as is an evaluable
bias of another form.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch.fx import Node

from autodeploy.export import example_inputs

_EXAMPLE_SEQ = 7  # odd, longer than 2, short enough to be free
_MASKED = torch.finfo(torch.float32).min / 2  # below this a score is masked out (HF uses finfo.min or -inf)
_META = torch.device("meta")


class UnsupportedBias(ValueError):
    """An additive score term that is neither a mask nor ALiBi."""


def _ancestors(nodes: Sequence[Node]) -> list[Node]:
    seen: dict[Node, None] = {}
    stack = list(nodes)
    while stack:
        node = stack.pop()
        if node not in seen:
            seen[node] = None
            stack.extend(node.all_input_nodes)
    order = {n: i for i, n in enumerate(nodes[0].graph.nodes)}
    return sorted(seen, key=order.__getitem__)


def _on_cpu(value):
    if isinstance(value, torch.device) and value == _META:
        return torch.device("cpu")
    if isinstance(value, (list, tuple)):
        return type(value)(_on_cpu(v) for v in value)
    if isinstance(value, dict):
        return {k: _on_cpu(v) for k, v in value.items()}
    return value


def _evaluate(nodes: Sequence[Node], seq: int) -> list[torch.Tensor] | None:
    """The values of `nodes` for one example sequence of length `seq`, or None where that is impossible."""
    module = nodes[0].graph.owning_module
    inputs = dict(zip(("input_ids", "position_ids"), example_inputs(1, seq, "cpu")))
    env: dict[Node, object] = {}

    def load(arg):
        return torch.fx.node.map_arg(arg, env.__getitem__)

    try:
        for node in _ancestors(nodes):
            if node.op == "placeholder":
                env[node] = inputs[node.target]
            elif node.op == "get_attr":
                value = _attr(module, node.target)
                if isinstance(value, torch.Tensor) and value.is_meta:
                    return None
                env[node] = value
            elif node.op == "call_function":
                env[node] = node.target(*_on_cpu(load(node.args)), **_on_cpu(load(node.kwargs)))
            else:
                return None
    except Exception:  # data-dependent or device-bound code: not a constant bias
        return None
    return [env[n] for n in nodes]


def _attr(module: torch.nn.Module, target: str):
    path, _, name = target.rpartition(".")
    return getattr(module.get_submodule(path) if path else module, name)


def _as_heads(term: torch.Tensor, n_heads: int) -> torch.Tensor:
    """[n_heads or 1, s_q or 1, s_k] from a 4-D [1, h, s_q, s_k] or a 3-D [1 * h, s_q, s_k] term."""
    term = term.float()
    if term.dim() == 4:
        term = term[0]
    if term.dim() != 3 or term.shape[0] not in (1, n_heads):
        raise UnsupportedBias(f"additive score term of shape {tuple(term.shape)}")
    return term


_SHAPE_ONLY = (torch.ops.aten.sym_size.int, torch.ops.aten.sym_numel.default, torch.ops.aten.sym_stride.int)


def _reads_parameters(term: Node) -> bool:
    """Whether `term`'s values are computed from a parameter of the model (weights: learned, not a mask). A size
    read off an activation (a mask as long as the hidden states) does not count."""
    module = term.graph.owning_module
    seen, stack = set(), [term]
    while stack:
        node = stack.pop()
        if node in seen or (node.op == "call_function" and node.target in _SHAPE_ONLY):
            continue
        seen.add(node)
        if node.op == "get_attr" and isinstance(_attr(module, node.target), torch.nn.Parameter):
            return True
        stack.extend(node.all_input_nodes)
    return False


def alibi_slopes(terms: Sequence[Node], n_heads: int) -> torch.Tensor | None:
    """The ALiBi slopes [n_heads] that `terms` add to the scores, None when they only mask."""
    if not terms:
        return None
    if any(_reads_parameters(t) for t in terms):
        raise UnsupportedBias("an additive score bias computed from the model's weights (a learned bias)")
    values = [v[0] for v in (_evaluate([t], _EXAMPLE_SEQ) for t in terms) if v is not None]
    if not values:
        return None
    total = sum(_as_heads(v, n_heads) for v in values)
    total = total.expand(n_heads, *total.shape[1:])
    allowed = total > _MASKED
    keys = torch.arange(total.shape[-1], dtype=torch.float32)
    last_row = allowed[0, -1].nonzero().flatten()
    if len(last_row) < 2:
        return None
    first, second = last_row[0], last_row[1]
    slopes = (total[:, -1, second] - total[:, -1, first]) / float(second - first)
    rest = torch.where(allowed, total - slopes[:, None, None] * keys, 0.0)
    row_offset = rest.gather(2, allowed.float().argmax(-1, keepdim=True))  # each row's first allowed key
    error = torch.where(allowed, rest - row_offset, 0.0).abs().max()
    if error > 1e-4 * max(1.0, float(total.masked_fill(~allowed, 0).abs().max())):
        raise UnsupportedBias("an additive score bias that is not linear in the key position (not ALiBi)")
    return slopes.contiguous() if slopes.abs().max() > 0 else None
