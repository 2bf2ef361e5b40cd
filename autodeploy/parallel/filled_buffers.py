"""A tensor made by `new_empty` and filled slice by slice with `copy_` becomes a `cat` of the pieces.

DeepSeek's MLA builds each head's key as [k_nope | k_pe] this way. In-place writes hide where the
key's values come from; as a `cat` the key is an ordinary value that the region flood follows
(split by heads), and the shared k_pe, expanded over the heads, is seen as a broadcast operand.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from autodeploy.graph_utils import is_op
from autodeploy.patterns.helpers import insert_call

from .regions import shape

aten = torch.ops.aten


def _pieces(buffer: Node, order: dict[Node, int]) -> tuple[int, list[Node], list[Node], Node] | None:
    """(dim, sources in order, copy_ nodes, first other reader) when `buffer`'s slices along one dim are each written once,
    cover it exactly with values of their own shape, and every other reader comes after the writes."""
    size, slices, readers = shape(buffer), [], []
    for user in buffer.users:
        if is_op(user, aten.slice) and len(user.users) == 1:
            slices.append(user)
        else:
            readers.append(user)
    if size is None or not slices or not readers:
        return None
    dims = {s.args[1] % len(size) for s in slices}
    if len(dims) != 1 or not isinstance(size[next(iter(dims))], int):
        return None
    dim = dims.pop()
    writes = []
    for part in slices:
        (copy,) = part.users
        start, stop = part.args[2] if len(part.args) > 2 else 0, part.args[3] if len(part.args) > 3 else size[dim]
        if (not is_op(copy, aten.copy_) or copy.args[0] is not part or copy.users or len(part.args) > 4
                or shape(copy.args[1]) != shape(part)):
            return None
        writes.append((start % size[dim], min(stop, size[dim]), copy))
    writes.sort(key=lambda w: w[0])
    bounds = [0] + [stop for _, stop, _ in writes]
    if [start for start, _, _ in writes] != bounds[:-1] or bounds[-1] != size[dim]:
        return None
    if min(order[r] for r in readers) < max(order[c] for _, _, c in writes):
        return None
    return dim, [c.args[1] for _, _, c in writes], [c for _, _, c in writes], min(readers, key=order.__getitem__)


def fills_to_cat(gm: GraphModule) -> int:
    """Replace every buffer filled by slice copies with the `cat` of what is copied; return how many."""
    graph, count = gm.graph, 0
    for buffer in [n for n in graph.nodes if is_op(n, aten.new_empty)]:
        order = {n: i for i, n in enumerate(graph.nodes)}
        found = _pieces(buffer, order)
        if found is None:
            continue
        dim, sources, copies, first_reader = found
        with graph.inserting_before(first_reader):
            joined = insert_call(graph, aten.cat.default, (sources, dim))
        slices = [c.args[0] for c in copies]
        for copy in copies:
            graph.erase_node(copy)
        for part in slices:
            graph.erase_node(part)
        buffer.replace_all_uses_with(joined)
        graph.erase_node(buffer)
        count += 1
    return count
