"""insert_state_cache: state-space / linear-attention ops -> their cached forms over state slots.

Runs after `insert_kv_cache` (the graph already has the packed interface; that transform builds it
for a model without any attention layer too, sizing blocks with `state_slot_bytes`). Every canonical op that
carries state between steps (causal conv1d, selective / SSD scans, gated delta rule) becomes its
`cached_*` form (kernels/ssm.py), reading and writing one **state slot** per sequence.

A sequence's slot is its first KV-cache block (`block_tables[:, 0]`): the block manager already
gives every running sequence distinct blocks and takes them back when it finishes or is
preempted, padding sequences use the scratch block, and the slot index is computed in the graph,
so the runtime, the batch layout and the CUDA graphs need no new input. The states are graph
buffers [num_blocks, ...] in float32, updated in place. (Prefix caching cannot share first blocks
of hybrid models: a state after a prefix is not stored. A slot pool sized by the batch instead of
the block count is a memory optimisation for later.)
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch.fx import GraphModule, Node

from autodeploy.graph_utils import is_op, replace_with_call
from autodeploy.patterns.helpers import bind_args, val
from autodeploy.runtime.kv_cache import STATE_SLOTS_KEY, kv_cache_of

from .registry import Stage, Transform, TransformContext, register

ops = torch.ops.autodeploy


def _state_shapes() -> dict:
    """Canonical op -> (its cached form, the state shape of one sequence from the op's arguments)."""
    shape: dict[object, Callable[[dict], tuple[int, ...]]] = {
        ops.causal_conv1d.default: lambda a: (val(a["x"]).shape[1], val(a["weight"]).shape[1] - 1),
        ops.gated_delta_rule.default: lambda a: (val(a["v"]).shape[2], val(a["q"]).shape[3], val(a["v"]).shape[3]),
        ops.ssd_scan.default: lambda a: (val(a["x"]).shape[2], val(a["x"]).shape[3], val(a["b"]).shape[3]),
        ops.selective_scan.default: lambda a: tuple(val(a["a"]).shape),
    }
    cached = {
        ops.causal_conv1d.default: ops.cached_causal_conv1d.default,
        ops.gated_delta_rule.default: ops.cached_gated_delta_rule.default,
        ops.ssd_scan.default: ops.cached_ssd_scan.default,
        ops.selective_scan.default: ops.cached_selective_scan.default,
    }
    return {op: (cached[op], shape[op]) for op in shape}


def _stateful(gm: GraphModule, table: dict) -> list[Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in table]


def state_slot_bytes(gm: GraphModule) -> int:
    """Bytes of one state slot (every stateful op's float32 state): what each KV block also costs, so
    `insert_kv_cache` sizes the pool with them and builds the packed interface for a model with no
    attention layer at all (its blocks then only name state slots)."""
    table = _state_shapes()
    return sum(4 * math.prod(table[n.target][1](bind_args(n))) for n in _stateful(gm, table))


def _placeholder(gm: GraphModule, name: str) -> Node:
    return next(n for n in gm.graph.nodes if n.op == "placeholder" and n.target == name)


@register
class InsertStateCache(Transform):
    name = "insert_state_cache"
    stage = Stage.CACHE

    def apply(self, gm: GraphModule, ctx: TransformContext) -> dict[str, int]:
        table = _state_shapes()
        stateful = _stateful(gm, table)
        if not stateful:
            return {"state_cache": 0}
        pool = kv_cache_of(gm)
        if pool is None:
            raise ValueError("insert_state_cache needs the packed interface: run insert_kv_cache first")
        meta = {name: _placeholder(gm, name) for name in ("cu_seqlens", "seq_lens", "block_tables")}
        with gm.graph.inserting_after(meta["block_tables"]):
            slots = gm.graph.call_function(torch.ops.aten.select.int, (meta["block_tables"], 1, 0))
        for i, node in enumerate(stateful):
            cached_op, state_shape = table[node.target]
            args = bind_args(node)
            name = f"state_cache_{i}"
            gm.register_buffer(name, torch.zeros(pool.num_blocks, *state_shape(args), device=ctx.device))
            with gm.graph.inserting_before(node):
                states = gm.graph.get_attr(name)
            operands = (*args.values(), states, meta["cu_seqlens"], meta["seq_lens"], slots)
            replace_with_call(gm, node, cached_op, operands)
            gm.graph.erase_node(node)
        gm.meta[STATE_SLOTS_KEY] = True  # the engine then keeps prefix caching off (first blocks are slots)
        return {"state_cache": len(stateful)}
