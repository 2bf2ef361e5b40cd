"""Split fused projections (qkv, gate_up as stored in the checkpoint) into one linear per part.

Phi-3's `qkv_proj` is sliced on its last dim, GPT-2's `c_attn` is `split` into q/k/v, Falcon's
multi-query `query_key_value` is viewed as heads and sliced by heads. Each part is
split over the ranks on its own (q by query heads, k/v by KV heads), so before sharding such a
linear becomes one linear per part, each with a parameter that is a row range of the checkpoint
tensor (a `ShardSlice` with `key`); the fusion stage fuses the local parts again afterwards.
"""

from __future__ import annotations

import operator

import torch
from torch.fx import GraphModule, Node

from autodeploy.export import WRAPPER_PREFIX
from autodeploy.graph_utils import is_op
from autodeploy.patterns.helpers import insert_call

from .regions import shape, weight_param
from .slices import ShardSlice

aten = torch.ops.aten


def _dim_arg(node: Node) -> int:
    return node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)


def _head_parts(linear: Node) -> tuple[Node, list[tuple[int, int, list[Node]]]] | None:
    """Falcon's multi-query layout: the fused output viewed as [..., heads, head_dim], then sliced by
    heads (q, k, v). Returns the view and [(start, stop, slices)] in features (heads x head_dim)."""
    (view,) = linear.users
    out, fused = shape(view), shape(linear)
    if (not is_op(view, aten.view) or out is None or len(out) != len(fused) + 1
            or str(out[:-2]) != str(fused[:-1]) or not all(isinstance(n, int) for n in out[-2:])
            or out[-2] * out[-1] != fused[-1]):
        return None
    heads, head_dim, parts = out[-2], out[-1], []
    for user in view.users:
        if not (is_op(user, aten.slice) and user.args[1] % len(out) == len(out) - 2 and len(user.args) == 4):
            return None
        start, stop = user.args[2] % heads, min(user.args[3], heads) if user.args[3] >= 0 else user.args[3] % heads
        parts.append((start * head_dim, stop * head_dim, [user]))
    return (view, parts) if len(parts) > 1 else None


def _parts(linear: Node) -> list[tuple[int, int, list[Node]]] | None:
    """[(start, stop, nodes reading exactly that range)] when every user takes a static last-dim range."""
    width, last = shape(linear)[-1], len(shape(linear)) - 1
    parts = []
    for user in linear.users:
        if is_op(user, aten.slice) and user.args[1] % (last + 1) == last and len(user.args) >= 4:
            start, stop = user.args[2] or 0, min(user.args[3], width)
            parts.append((start % width if start < 0 else start, stop % width if stop < 0 else stop, [user]))
        elif is_op(user, (aten.split, aten.chunk)) and _dim_arg(user) % (last + 1) == last and isinstance(user.args[1], int):
            size = user.args[1] if is_op(user, aten.split) else -(-width // user.args[1])
            for get in user.users:
                if get.target is not operator.getitem:
                    return None
                parts.append((get.args[1] * size, min((get.args[1] + 1) * size, width), [get]))
        else:
            return None
    return parts if len(parts) > 1 else None


def _part_param(gm: GraphModule, get_attr: Node, dim: int, start: int, stop: int, slices: dict) -> Node:
    """A new parameter holding rows [start, stop) (along `dim`) of `get_attr`'s checkpoint tensor."""
    owner_path, _, attr = get_attr.target.rpartition(".")
    owner = gm.get_submodule(owner_path)
    full = getattr(owner, attr)
    spec = ShardSlice(dim, ((start, stop),), key=get_attr.target.removeprefix(WRAPPER_PREFIX), size=full.shape[dim])
    name = f"{attr}_rows_{start}_{stop}"
    owner.register_parameter(name, torch.nn.Parameter(
        torch.empty(spec.local_shape(full.shape), dtype=full.dtype, device="meta"), requires_grad=False))
    target = f"{owner_path}.{name}"
    slices[target.removeprefix(WRAPPER_PREFIX)] = spec
    with gm.graph.inserting_before(get_attr):
        node = gm.graph.get_attr(target)
    node.meta["val"] = get_attr.meta["val"].narrow(dim, start, stop - start)
    return node


def split_fused_linears(gm: GraphModule, slices: dict) -> int:
    """Replace every linear whose output is only ever read in static last-dim ranges; return how many."""
    count = 0
    for linear in [n for n in gm.graph.nodes if is_op(n, torch.ops.autodeploy.linear)]:
        found = weight_param(linear.args[1])
        if found is None or shape(linear) is None:
            continue
        view, parts = None, _parts(linear)
        if parts is None and len(linear.users) == 1:
            view, parts = _head_parts(linear) or (None, None)
        if parts is None:
            continue
        weight, transposed = found
        old_weight = linear.args[1]  # the get_attr, or its transpose (GPT-2's Conv1D)
        bias = linear.args[2] if len(linear.args) > 2 else None
        for start, stop, readers in parts:
            w = _part_param(gm, weight, 1 if transposed else 0, start, stop, slices)
            with gm.graph.inserting_before(linear):
                if transposed:
                    w = insert_call(gm.graph, aten.t.default, (w,))
                b = _part_param(gm, bias, 0, start, stop, slices) if bias is not None else None
                part = insert_call(gm.graph, torch.ops.autodeploy.linear.default, (linear.args[0], w, b))
            if view is not None:  # each part viewed as its own heads
                sizes = list(view.args[1])
                sizes[-2] = (stop - start) // sizes[-1]
                with gm.graph.inserting_before(view):
                    part = insert_call(gm.graph, aten.view.default, (part, sizes))
            for reader in readers:
                reader.replace_all_uses_with(part)
        for node in list(linear.users):
            for get in list(node.users):
                gm.graph.erase_node(get)
            gm.graph.erase_node(node)
        gm.graph.erase_node(linear)
        if old_weight is not weight and not old_weight.users:
            gm.graph.erase_node(old_weight)
        for param in (weight, bias):
            if param is not None and not param.users:
                owner_path, _, attr = param.target.rpartition(".")
                delattr(gm.get_submodule(owner_path), attr)
                gm.graph.erase_node(param)
        count += 1
    return count
