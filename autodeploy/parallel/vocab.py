"""Vocab-parallel embedding and LM head: each rank holds a contiguous range of vocabulary rows.

The embedding looks up only the ids in its range (others masked to zero) and the ranks' rows are
summed by an all_reduce; the LM head computes its range of logits and an all_gather joins them in
rank order, so the sampler sees every logit. A tied table is one parameter: it is sliced once and
both uses read the same rows.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from autodeploy.graph_utils import is_op
from autodeploy.patterns.helpers import insert_call

from .regions import refresh, shape, weight_param

aten = torch.ops.aten


def local_ids(graph, ids: Node, first: int, count: int) -> tuple[Node, Node]:
    """(ids shifted into [0, count) and clamped, mask of those that were in [first, first + count))."""
    shifted = insert_call(graph, aten.sub.Tensor, (ids, first))
    mine = insert_call(graph, aten.bitwise_and.Tensor, (insert_call(graph, aten.ge.Scalar, (shifted, 0)),
                                                         insert_call(graph, aten.lt.Scalar, (shifted, count))))
    return insert_call(graph, aten.clamp.default, (shifted, 0, count - 1)), mine


def vocab_nodes(gm: GraphModule, vocab: int) -> tuple[list[Node], list[Node]]:
    """(embedding lookups, LM-head linears) whose table has `vocab` rows."""
    embeddings = [n for n in gm.graph.nodes if is_op(n, aten.embedding) and n.args[0].op == "get_attr"
                  and shape(n.args[0]) is not None and shape(n.args[0])[0] == vocab]
    heads = [n for n in gm.graph.nodes if is_op(n, torch.ops.autodeploy.linear) and shape(n) is not None
             and shape(n)[-1] == vocab and weight_param(n.args[1]) == (n.args[1], False) and reaches_output(n)]
    return embeddings, heads


def reaches_output(linear: Node) -> bool:
    """Whether `linear`'s values reach the graph's output without passing through another linear."""
    seen, todo = set(), [linear]
    while todo:
        for user in todo.pop().users:
            if user.op == "output":
                return True
            if user not in seen and not is_op(user, torch.ops.autodeploy.linear):
                seen.add(user)
                todo.append(user)
    return False


def shard_vocab(sharder, vocab: int) -> str | None:
    """Split embeddings and LM heads of `vocab` rows over the sharder's ranks; why not, when they stay."""
    if vocab % sharder.world:
        return f"vocabulary of {vocab} does not split over {sharder.world} ranks"
    count = vocab // sharder.world
    first = sharder.rank * count
    rows = [(first, first + count)]
    embeddings, heads = vocab_nodes(sharder.gm, vocab)
    graph, sliced = sharder.gm.graph, set()
    for node in [n.args[0] for n in embeddings] + [n.args[1] for n in heads]:
        if node.target not in sliced:
            sharder.slice_param(node, 0, rows)
            sliced.add(node.target)
    for embedding in embeddings:
        with graph.inserting_before(embedding):
            ids, mine = local_ids(graph, embedding.args[1], first, count)
        embedding.args = (embedding.args[0], ids)  # padding_idx only matters for gradients
        refresh(embedding)
        with graph.inserting_after(embedding):
            keep = insert_call(graph, aten.unsqueeze.default, (mine, -1))
        users = list(embedding.users)
        with graph.inserting_after(keep):
            masked = insert_call(graph, aten.mul.Tensor, (embedding, keep))
        for user in users:
            user.replace_input_with(embedding, masked)
        sharder.all_reduce_after(masked)
    for head in heads:
        if len(head.args) > 2 and head.args[2] is not None and head.args[2].target not in sliced:
            sharder.slice_param(head.args[2], 0, rows)
        refresh(head)
        users = list(head.users)
        with graph.inserting_after(head):
            logits = insert_call(graph, torch.ops.autodeploy.all_gather.default, (head, -1, sharder.world))
        for user in users:
            user.replace_input_with(head, logits)
    sharder.counts["vocab_parallel"] = len(embeddings) + len(heads)
    return None
