"""Find tensor-parallel regions in a graph: column-parallel openers, the ops between, row-parallel closers.

A region starts at linears whose input is replicated (q/k/v, gate/up) and follows their outputs
forward through ops that act independently along the split dim (views that keep heads outermost,
transposes, casts, pointwise ops, RoPE, per-head norms, attention over heads, the gated activation)
until each path reaches a linear that reads the split features as its input (o_proj, down_proj):
that linear is row-parallel and its partial sums are all-reduced. Floods that meet share a region.
A flood that meets any other op (a norm over the split dim, a graph output, a softmax over
features) fails, and its region stays replicated: never silently wrong.

Only dims are tracked here; which fraction of the dim each rank holds is decided by the transform.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
from torch._guards import detect_fake_mode
from torch.fx import GraphModule, Node
from torch.utils._pytree import tree_leaves, tree_map

from autodeploy.graph_utils import is_op
from autodeploy.patterns.helpers import val

aten = torch.ops.aten
ad = torch.ops.autodeploy

SAME_DIM = (aten.to, aten._to_copy, aten.contiguous, aten.clone, aten.alias, aten.detach, aten.type_as)
EXPANDS = (aten.expand, aten.broadcast_to)  # size lists that carry head counts, like views
_VIEWS = (aten.view, aten.reshape, aten._unsafe_view, aten.unsqueeze, aten.squeeze, aten.flatten)


@dataclass
class Region:
    """Nodes whose values are split (node -> split dim), the linears that open and close them."""

    dims: dict[Node, int] = field(default_factory=dict)
    openers: list[Node] = field(default_factory=list)
    closers: list[Node] = field(default_factory=list)
    error: str | None = None

    def merge(self, other: "Region") -> None:
        for node, dim in other.dims.items():
            if self.dims.setdefault(node, dim) != dim:
                self.error = self.error or f"{node.name} is split on two different dims"
        self.openers += [n for n in other.openers if n not in self.openers]
        self.closers += [n for n in other.closers if n not in self.closers]
        self.error = self.error or other.error


def shape(node) -> tuple | None:
    val = node.meta.get("val") if isinstance(node, Node) else None
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def refresh(node: Node) -> None:
    """Recompute `node`'s FakeTensor from its (possibly resharded) inputs."""
    fake_args = tree_map(lambda a: val(a) if isinstance(a, Node) else a, node.args)
    fake_kwargs = tree_map(lambda a: val(a) if isinstance(a, Node) else a, node.kwargs)
    mode = detect_fake_mode(tree_leaves((fake_args, fake_kwargs)))
    if mode is not None:
        with mode:
            node.meta["val"] = node.target(*fake_args, **fake_kwargs)


def weight_param(node) -> tuple[Node, bool] | None:
    """The get_attr a linear's weight comes from and whether it is stored [in, out] (GPT-2 Conv1D)."""
    if isinstance(node, Node) and node.op == "get_attr":
        return node, False
    if isinstance(node, Node) and is_op(node, (aten.t, aten.transpose)) and node.args[0].op == "get_attr":
        return node.args[0], True
    return None


def _view_dim(src: tuple, dst: tuple, dim: int) -> int | None:
    """Where split dim `dim` of `src` lands in `dst` when the view keeps it outermost of its group.

    Failing that, size-1 dims are left out of the comparison (MLA views its latent as [B, 1, S, r])."""
    found = _aligned_view_dim(list(src), list(dst), dim)
    if found is not None:
        return found if found < len(dst) else None
    src_kept = [i for i, size in enumerate(src) if str(size) != "1"]
    dst_kept = [i for i, size in enumerate(dst) if str(size) != "1"]
    if dim not in src_kept:
        return None
    found = _aligned_view_dim([src[i] for i in src_kept], [dst[i] for i in dst_kept], src_kept.index(dim))
    return dst_kept[found] if found is not None and found < len(dst_kept) else None


def _aligned_view_dim(src: list, dst: list, dim: int) -> int | None:
    same = [str(a) == str(b) for a, b in zip(src, dst)]
    prefix = same.index(False) if False in same else len(same)
    suffix = 0
    while suffix < min(len(src), len(dst)) - prefix and str(src[-1 - suffix]) == str(dst[-1 - suffix]):
        suffix += 1
    if dim <= prefix:
        return dim
    if dim >= len(src) - suffix:
        return dim - len(src) + len(dst)
    return None


def _broadcasts(other, out_shape: tuple, dim: int) -> bool:
    """Whether a replicated operand has size 1 (or no dim) where the output is split."""
    other_shape = shape(other)
    if other_shape is None:
        return not isinstance(other, Node)  # python scalars broadcast; untyped nodes do not
    offset = len(out_shape) - len(other_shape)
    return dim < offset or other_shape[dim - offset] == 1


def _out_dim(node: Node, src: Node, dim: int) -> int | str:
    """The split dim of `node`'s output when its input `src` is split on `dim`, or why it cannot be."""
    out, inp = shape(node), shape(src)
    if is_op(node, SAME_DIM) or node.target is operator.getitem:
        return dim
    if inp is None or (out is None and not is_op(node, (aten.split, aten.split_with_sizes))):
        return f"{node.name} has no recorded shape"
    ndim = len(inp)
    if is_op(node, _VIEWS):
        found = _view_dim(inp, out, dim)
        return found if found is not None else f"{node.name} reshapes the split dim"
    if is_op(node, aten.transpose):
        a, b = (d % ndim for d in node.args[1:3])
        return b if dim == a else a if dim == b else dim
    if is_op(node, aten.permute):
        return [d % ndim for d in node.args[1]].index(dim)
    if is_op(node, EXPANDS):
        return dim
    if is_op(node, (aten.split, aten.split_with_sizes)):
        along = (node.args[2] if len(node.args) > 2 else 0) % ndim
        return dim if along != dim else f"{node.name} splits the split dim"
    if is_op(node, (aten.slice, aten.select)):
        along = (node.args[1] if len(node.args) > 1 else 0) % ndim
        if along == dim:
            return f"{node.name} slices the split dim"
        return dim - 1 if is_op(node, aten.select) and along < dim else dim
    if is_op(node, aten.cat):
        along = (node.args[1] if len(node.args) > 1 else 0) % ndim
        return dim if along != dim else f"{node.name} concatenates along the split dim"
    if is_op(node, (ad.rms_norm, ad.rope)):
        return dim if node.args[0] is src and dim != ndim - 1 else f"{node.name} normalises/rotates the split dim"
    if is_op(node, ad.attention):
        return 1 if dim == 1 and src in node.args[:3] else f"{node.name} is not split by heads"
    if is_op(node, ad.gated_act) or (isinstance(node.target, torch._ops.OpOverload)
                                     and torch.Tag.pointwise in node.target.tags):
        return dim + len(out) - ndim
    return f"{node.name} ({node.target}) is not known to act independently along the split dim"


def _check_operands(node: Node, dims: dict[Node, int]) -> str | None:
    """Every tensor operand of a split op is split the same way or broadcasts along the split dim."""
    out, dim = shape(node), dims[node]
    if is_op(node, (ad.attention, ad.gated_act)):
        n = 3 if is_op(node, ad.attention) else 2
        missing = [a.name for a in node.args[:n] if a not in dims]
        return f"{node.name} mixes split and replicated operands ({', '.join(missing)})" if missing else None
    if is_op(node, aten.cat):
        missing = [a.name for a in node.args[0] if a not in dims]
        return f"{node.name} concatenates replicated {', '.join(missing)} to split values" if missing else None
    if is_op(node, (ad.rms_norm, ad.rope)) or not isinstance(node.target, torch._ops.OpOverload):
        return None
    if torch.Tag.pointwise in node.target.tags:
        for arg in node.args:
            if isinstance(arg, Node) and arg not in dims and not _broadcasts(arg, out, dim):
                return f"{node.name} combines a split value with replicated {arg.name}"
    return None


def _absorb_broadcasts(region: Region) -> None:
    """A replicated value expanded from size 1 along the split dim into a split `cat` (MLA's k_pe shared
    by every head) joins the region: each rank expands it to its local size instead."""
    for node in [n for n in region.dims if is_op(n, aten.cat)]:
        dim = region.dims[node]
        for operand in node.args[0]:
            if (operand not in region.dims and is_op(operand, EXPANDS) and set(operand.users) == {node}
                    and shape(operand.args[0]) is not None and shape(operand.args[0])[dim] == 1):
                region.dims[operand] = dim


def flood(opener: Node) -> Region:
    """The region reached from column-parallel candidate `opener` (a linear), with its closers."""
    region = Region(openers=[opener])
    region.dims[opener] = len(shape(opener)) - 1
    todo = [opener]
    while todo and region.error is None:
        src = todo.pop()
        for user in src.users:
            if is_op(user, ad.linear) and user.args[0] is src:
                if region.dims[src] != len(shape(src)) - 1:
                    region.error = f"{user.name} reads a value split on a dim other than its features"
                elif user not in region.closers:
                    region.closers.append(user)
                continue
            dim = _out_dim(user, src, region.dims[src])
            if isinstance(dim, str):
                region.error = dim
                break
            if user not in region.dims:
                region.dims[user] = dim
                todo.append(user)
            elif region.dims[user] != dim:
                region.error = f"{user.name} is reached split on two different dims"
    return region


def find_regions(gm: GraphModule) -> list[Region]:
    """Every region a linear opens, merged where floods meet; operands checked on the merged region."""
    regions: list[Region] = []
    for node in gm.graph.nodes:
        if not is_op(node, ad.linear) or weight_param(node.args[1]) is None or shape(node) is None:
            continue
        if any(node in r.closers or node in r.dims for r in regions):
            continue  # a closer is not an opener: its input is already split
        region = flood(node)
        for other in [r for r in regions if r.dims.keys() & region.dims.keys()]:
            region.merge(other)
            regions.remove(other)
        regions.append(region)
    for region in regions:
        _absorb_broadcasts(region)
        for node in region.dims:
            if region.error is None and node not in region.openers:
                region.error = _check_operands(node, region.dims)
        if region.error is None and not region.closers:
            region.error = "no row-parallel linear closes it"
    return regions
