"""shard_tensor_parallel: rewrite the graph into one rank's shard (Megatron-style, found in the graph).

Regions come from `autodeploy.parallel.regions`: column-parallel openers keep this rank's output
rows, row-parallel closers keep the matching input columns and are followed by
`autodeploy::all_reduce` (their bias is added once, after it). Attention is split by heads: query
heads evenly, KV heads evenly too, or replicated (the one KV head a rank's query heads share) when
there are more ranks than KV heads. Views, reshapes and expands inside a region get the local sizes.
Routed experts (`autodeploy::moe`) are split by expert (expert parallel: each rank owns a range of
experts and masks the routing) or inside every expert (TP). Each sharded parameter records the
checkpoint slice it loads (`autodeploy.parallel.slices`). What cannot be derived stays replicated
with a warning naming it. Rank and world size: the recipe's `parallel` section, else the process group.
"""

from __future__ import annotations

from fractions import Fraction

import torch
from torch.fx import GraphModule, Node

from autodeploy.errors import ShardingError
from autodeploy.export import WRAPPER_PREFIX
from autodeploy.graph_utils import is_op, module_path
from autodeploy.kernels.gated_act import INTERLEAVED
from autodeploy.parallel.filled_buffers import fills_to_cat
from autodeploy.parallel.regions import EXPANDS, SAME_DIM, Region, find_regions, refresh, shape, weight_param
from autodeploy.parallel.settings import check_head_counts, head_counts
from autodeploy.parallel.slices import SHARDS_KEY, ShardSlice
from autodeploy.parallel.tp_plan import compare_with_plan
from autodeploy.parallel.unfuse import split_fused_linears
from autodeploy.parallel.vocab import local_ids, reaches_output, shard_vocab
from autodeploy.patterns.helpers import bind_args, insert_call
from autodeploy.patterns.moe import stored_expert_weight

from .registry import Stage, Transform, TransformContext, register

aten = torch.ops.aten
ad = torch.ops.autodeploy


def rank_and_world(ctx: TransformContext) -> tuple[int, int]:
    """(rank, world size) from the recipe's parallel section; rank -1 means the process group's."""
    settings = ctx.parallel
    world = settings.tensor_parallel_size if settings is not None else 1
    rank = settings.rank if settings is not None else -1
    if rank < 0:
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    if world < 1 or not 0 <= rank < world:
        raise ShardingError(f"parallel.rank {rank} is not a rank of tensor_parallel_size {world}")
    return rank, world


class _Sharder:
    """Rewrites one graph for (rank, world): parameters, views, collectives; counts what it did."""

    def __init__(self, gm: GraphModule, ctx: TransformContext, rank: int, world: int):
        self.gm, self.ctx, self.rank, self.world = gm, ctx, rank, world
        self.slices: dict[str, ShardSlice] = gm.meta.setdefault(SHARDS_KEY, {})
        self.counts = {"column": 0, "row": 0, "all_reduce": 0, "attention": 0}
        self.styles: dict[str, str] = {}  # HF module path of a sharded linear -> colwise / rowwise

    # --- parameters -----------------------------------------------------------------------------
    def slice_param(self, get_attr: Node, dim: int, ranges: list[tuple[int, int]]) -> None:
        """Give `get_attr`'s parameter this rank's shape on meta and record the checkpoint slice.

        A parameter that is already a part of a fused checkpoint tensor takes ranges within its part."""
        name = get_attr.target
        owner_path, _, attr = name.rpartition(".")
        owner = self.gm.get_submodule(owner_path)
        full = getattr(owner, attr)
        dim %= full.dim()
        spec = ShardSlice(dim, tuple(ranges), size=full.shape[dim])
        part = self.slices.get(name.removeprefix(WRAPPER_PREFIX))
        if part is not None:
            ((offset, _),) = part.ranges
            spec = ShardSlice(dim, tuple((offset + a, offset + b) for a, b in ranges), part.key, part.size)
        local = torch.empty(spec.local_shape(full.shape), dtype=full.dtype, device="meta")
        setattr(owner, attr, torch.nn.Parameter(local, requires_grad=False) if isinstance(full, torch.nn.Parameter)
                else local)
        self.slices[name.removeprefix(WRAPPER_PREFIX)] = spec
        get_attr.meta["val"] = refreshed_val(get_attr.meta.get("val"), spec)

    def slice_constant(self, get_attr: Node, ranges: list[tuple[int, int]]) -> None:
        """Keep this rank's rows of a constant the graph computed (ALiBi slopes of its query heads)."""
        owner_path, _, attr = get_attr.target.rpartition(".")
        owner = self.gm.get_submodule(owner_path)
        ((start, stop),) = ranges
        setattr(owner, attr, getattr(owner, attr)[start:stop].clone())
        get_attr.meta["val"] = get_attr.meta["val"][start:stop]

    def fraction_ranges(self, size: int, start: Fraction, frac: Fraction) -> list[tuple[int, int]]:
        begin, length = start * size, frac * size
        if begin.denominator != 1 or length.denominator != 1:
            raise ValueError(f"{size} does not split into parts of {frac}")
        return [(int(begin), int(begin + length))]

    # --- regions --------------------------------------------------------------------------------
    def shard_region(self, region: Region, heads: tuple[int, int]) -> None:
        """Column openers, rewritten sizes, row closers + all_reduce, for one region.

        Every size is computed before anything changes: a ValueError leaves the graph as it was."""
        q_part = (Fraction(self.rank, self.world), Fraction(1, self.world))
        n_kv = heads[1]
        kv_part = q_part if n_kv % self.world == 0 else (Fraction(self.rank * n_kv // self.world, n_kv), Fraction(1, n_kv))
        part = {}
        for opener in region.openers:
            operands = _attention_operands(opener, region)
            if 0 in operands and operands & {1, 2} and kv_part != q_part:
                raise ValueError(f"{opener.name} computes queries and keys/values together, and the "
                                 f"{n_kv} key/value heads do not split over {self.world} ranks")
            part[opener] = kv_part if operands & {1, 2} else q_part
        broadcast = []
        for node in self.gm.graph.nodes:  # in order: a split node takes the part of what feeds it (attention: q's)
            if node in region.dims and node not in part:
                source = node.args[0] if is_op(node, ad.attention) else next(
                    (a for a in node.all_input_nodes if a in part), None)
                if source is None:
                    broadcast.append(node)
                else:
                    part[node] = part[source]
        for node in broadcast:  # a replicated value expanded into a split cat takes the cat's part
            part[node] = part[next(iter(node.users))]
        rows = {o: self.fraction_ranges(shape(o)[-1], *part[o]) for o in region.openers}
        cols = {c: self.fraction_ranges(shape(c.args[0])[-1], *part[c.args[0]]) for c in region.closers}
        sizes = {n: _local_sizes(n, region.dims[n], part[n][1]) for n in region.dims
                 if is_op(n, (aten.view, aten.reshape, aten._unsafe_view, *EXPANDS))}
        for opener, ranges in rows.items():
            weight, transposed = weight_param(opener.args[1])
            self.styles[_weight_owner(opener)] = "colwise"
            self.slice_param(weight, 1 if transposed else 0, ranges)
            if len(opener.args) > 2 and opener.args[2] is not None:
                self.slice_param(opener.args[2], 0, ranges)
            self.counts["column"] += 1
        for node, local in sizes.items():
            node.args = (node.args[0], local, *node.args[2:])
        for attention in [n for n in region.dims if is_op(n, ad.attention)]:
            args = bind_args(attention)
            slopes, sinks = args.get("alibi_slopes"), args.get("sinks")
            if isinstance(slopes, Node) and slopes.op == "get_attr":
                self.slice_constant(slopes, self.fraction_ranges(shape(slopes)[0], *part[attention]))
            if isinstance(sinks, Node):  # the model's [n_heads] parameter: this rank's heads
                if sinks.op != "get_attr":
                    raise ShardingError(f"{module_path(attention)}: attention sinks the graph computes (not a "
                                        "parameter) do not shard yet")
                self.slice_param(sinks, 0, self.fraction_ranges(shape(sinks)[0], *part[attention]))
        for closer, ranges in cols.items():
            self.styles[_weight_owner(closer)] = "rowwise"
            self.close(closer, ranges)
        self.counts["attention"] += sum(is_op(n, ad.attention) for n in region.dims)
        transposed_weights = {n.args[1] for n in region.openers + region.closers if n.args[1].op != "get_attr"}
        for node in self.gm.graph.nodes:  # in order, so each node sees its inputs' new shapes
            if node in region.dims or node in region.closers or node in transposed_weights:
                refresh(node)

    # --- routed experts -------------------------------------------------------------------------
    def shard_experts(self, moe: Node, expert_parallel: bool) -> None:
        """Whole experts per rank (routing masked to them) or a slice of every expert; then all_reduce."""
        x, ids, weights, w_gate_up, w_down, activation, *biases = moe.args
        gate_up, gate_up_t = stored_expert_weight(w_gate_up)
        down, down_t = stored_expert_weight(w_down)
        experts, inner = shape(w_gate_up)[0], shape(w_down)[2]
        b_gate_up, b_down = (list(biases) + [None, None])[:2]
        if expert_parallel:
            if experts % self.world:
                raise ValueError(f"{experts} experts do not split over {self.world} ranks")
            local = experts // self.world
            first = self.rank * local
            for param in (gate_up, down, b_gate_up, b_down):
                if param is not None:
                    self.slice_param(param, 0, [(first, first + local)])
            moe.args = (x, *self._local_routing(moe, ids, weights, first, local), *moe.args[3:])
            self.counts["experts_per_rank"] = local
        else:
            if inner % self.world:
                raise ValueError(f"expert width {inner} does not split over {self.world} ranks")
            part = inner // self.world
            start = self.rank * part
            rows = ([(2 * start, 2 * (start + part))] if activation in INTERLEAVED  # alternating gate / up rows
                    else [(start, start + part), (inner + start, inner + start + part)])  # gate rows, then up rows
            self.slice_param(gate_up, 2 if gate_up_t else 1, rows)
            self.slice_param(down, 1 if down_t else 2, [(start, start + part)])
            if b_gate_up is not None:
                self.slice_param(b_gate_up, 1, rows)
            if b_down is not None and self.rank != 0:  # the down bias is added once, by rank 0
                with self.gm.graph.inserting_before(moe):
                    moe.update_arg(7, insert_call(self.gm.graph, aten.mul.Tensor, (b_down, 0.0)))
            self.counts["experts_per_rank"] = experts
        for node in (w_gate_up, w_down, moe):
            refresh(node)
        self.all_reduce_after(moe)
        self.counts["moe"] = self.counts.get("moe", 0) + 1

    def _local_routing(self, moe: Node, ids: Node, weights: Node, first: int, local: int) -> tuple[Node, Node]:
        """Expert ids shifted to this rank's range; weights of other ranks' experts zeroed."""
        graph = self.gm.graph
        with graph.inserting_before(moe):
            shifted, mine = local_ids(graph, ids, first, local)
            local_weights = insert_call(graph, aten.mul.Tensor, (weights, mine))
        return shifted, local_weights

    def all_reduce_after(self, node: Node, bias: Node | None = None) -> None:
        """`node`'s users read the sum over ranks (plus `bias`, added once) instead of `node`."""
        users = list(node.users)
        with self.gm.graph.inserting_after(node):
            total = insert_call(self.gm.graph, ad.all_reduce.default, (node,))
        last = total
        if bias is not None:
            with self.gm.graph.inserting_after(total):
                last = insert_call(self.gm.graph, aten.add.Tensor, (total, bias))
        for user in users:
            user.replace_input_with(node, last)
        self.counts["all_reduce"] += 1

    def close(self, closer: Node, cols: list[tuple[int, int]]) -> None:
        """Row-parallel: this rank's input columns, then all_reduce, then the bias once."""
        weight, transposed = weight_param(closer.args[1])
        self.slice_param(weight, 0 if transposed else 1, cols)
        bias = closer.args[2] if len(closer.args) > 2 else None
        closer.args = (closer.args[0], closer.args[1], None)
        self.all_reduce_after(closer, bias)
        self.counts["row"] += 1


def _only_routing(node: Node) -> bool:
    """Whether `node`'s values (through casts) only become routing probabilities (a MoE router)."""
    return all(is_op(u, (aten.softmax, aten._softmax, aten.sigmoid)) or (is_op(u, SAME_DIM) and _only_routing(u))
               for u in node.users)


def _weight_owner(linear: Node) -> str:
    """The HF module path holding a linear's weight (a fused part's too)."""
    weight, _ = weight_param(linear.args[1])
    return weight.target.removeprefix(WRAPPER_PREFIX).rpartition(".")[0]


def _low_rank(linear: Node) -> bool:
    """A down-projection (fewer outputs than inputs) that shares its input with another linear."""
    features_in, features_out = shape(linear.args[0]), shape(linear)
    siblings = [u for u in linear.args[0].users if u is not linear and is_op(u, ad.linear)]
    return bool(siblings) and features_in is not None and features_out[-1] < features_in[-1]


def _attention_operands(opener: Node, region: Region) -> set[int]:
    """Which operands of attention (0 query, 1 key, 2 value) `opener`'s values reach."""
    seen, todo, reached = set(), [opener], set()
    while todo:
        node = todo.pop()
        for user in node.users:
            if is_op(user, ad.attention):
                reached |= {i for i, arg in enumerate(user.args[:3]) if arg is node}
            elif user in region.dims and user not in seen:
                seen.add(user)
                todo.append(user)
    return reached


def _local_sizes(node: Node, dim: int, frac: Fraction) -> list:
    """A view/reshape/expand's size list with the split dim's literal size made local (-1 stays)."""
    sizes = list(node.args[1])
    size = sizes[dim]
    if isinstance(size, int) and size > 0:
        local = size * frac
        if local.denominator != 1:
            raise ValueError(f"{node.name}: size {size} does not split into parts of {frac}")
        sizes[dim] = int(local)
    return sizes


def refreshed_val(old, spec: ShardSlice):
    return old.narrow(spec.dim, 0, spec.length) if isinstance(old, torch.Tensor) else old


@register
class ShardTensorParallel(Transform):
    name = "shard_tensor_parallel"
    stage = Stage.SHARDING

    def apply(self, gm: GraphModule, ctx: TransformContext) -> dict[str, int]:
        rank, world = rank_and_world(ctx)
        if world == 1:
            return {}
        heads = head_counts(ctx.source.config.get_text_config()) or (1, 1)
        attention = [n for n in gm.graph.nodes if is_op(n, ad.attention)]
        if attention:
            check_head_counts(*heads, world)
        sharder = _Sharder(gm, ctx, rank, world)
        sharder.counts["fused_split"] = split_fused_linears(gm, sharder.slices)
        sharder.counts["filled_to_cat"] = fills_to_cat(gm)
        linears = [_weight_owner(n) for n in gm.graph.nodes if is_op(n, ad.linear) and weight_param(n.args[1])]
        for region in find_regions(gm):
            if region.error is None:
                try:
                    sharder.shard_region(region, heads)
                    continue
                except ValueError as e:  # a size that does not split: raised before anything changed
                    region.error = str(e)
            self.note_replicated(region, sharder.counts)
        for moe in [n for n in gm.graph.nodes if is_op(n, ad.moe)]:
            try:
                sharder.shard_experts(moe, ctx.parallel.enable_expert_parallel)
            except ValueError as e:
                self.warnings.append(f"{self.name}: {moe.name} stays replicated: {e}")
        if ctx.parallel.split_vocab:
            why_not = shard_vocab(sharder, ctx.source.config.get_text_config().vocab_size)
            if why_not:
                self.warnings.append(f"{self.name}: the embedding and LM head stay replicated: {why_not}")
        counts = dict(sharder.counts)
        self.cross_check(getattr(ctx.source.config.get_text_config(), "base_model_tp_plan", None),
                         linears, sharder.styles, counts)
        counts["heads_per_rank"] = heads[0] // world
        counts["kv_heads_per_rank"] = max(1, heads[1] // world)
        counts["weight_bytes_per_rank"] = weight_bytes(gm, ctx.dtype)
        return counts

    def cross_check(self, plan: dict | None, linears: list[str], styles: dict[str, str], counts: dict) -> None:
        """HF's base_model_tp_plan against what the graph analysis decided: counts, and a warning if they part."""
        if not plan:
            return
        counts["tp_plan_agree"], disagree = compare_with_plan(plan, linears, styles)
        counts["tp_plan_disagree"] = len(disagree)
        if disagree:
            self.warnings.append(f"{self.name}: HF's base_model_tp_plan disagrees on {len(disagree)} linears: "
                                 + "; ".join(disagree[:3]) + (" ..." if len(disagree) > 3 else ""))

    def note_replicated(self, region: Region, counts: dict[str, int]) -> None:
        """A warning naming what stays replicated, except by design: the LM head, routers, and low-rank
        down-projections beside other linears on the same input (MLA's q_a / kv_a, counted instead)."""
        opener = region.openers[0]
        by_design = len(region.openers) == 1 and not region.closers and (
            reaches_output(opener) or _only_routing(opener))
        if _low_rank(opener) and not any(is_op(n, ad.attention) for n in region.dims):
            counts["replicated_low_rank"] = counts.get("replicated_low_rank", 0) + 1
        elif not by_design:
            where = module_path(opener) or opener.name
            self.warnings.append(f"{self.name}: {where} ({opener.name}) stays replicated: {region.error}")

    def expected(self, gm: GraphModule, ctx: TransformContext) -> dict[str, int]:
        if rank_and_world(ctx)[1] == 1:
            return {}
        return {"attention": sum(is_op(n, ad.attention) for n in gm.graph.nodes)}


def weight_bytes(gm: GraphModule, dtype: torch.dtype) -> int:
    """Bytes of this rank's parameters and buffers once loaded (floating ones in the model dtype)."""
    total = 0
    for t in list(gm.parameters()) + list(gm.buffers()):
        size = torch.empty((), dtype=dtype).element_size() if t.is_floating_point() else t.element_size()
        total += t.numel() * size
    return total
