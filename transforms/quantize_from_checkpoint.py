"""quantize_from_checkpoint: a pre-quantized checkpoint's linears become quantized ops over its tensors.

Detects the format (compressed-tensors, ModelOpt FP8, GPTQ, AWQ; autodeploy/quantization/checkpoint.py),
swaps each linear the checkpoint stores quantized for fp8_linear / int_linear, and each MoE whose
per-expert projections it stores quantized for fp8_moe / int_moe (autodeploy/quantization/moe_checkpoint.py),
and records how `load_weights` reads the stored tensors into the canonical layout: the weights are
never dequantized to a full-precision copy. KV-cache scales the checkpoint carries go to gm.meta for
insert_kv_cache (used when the cache is FP8). Asking for another scheme than the checkpoint's
(`quantization.algo`) is an error rather than a silent re-quantization of already rounded weights.
"""

from __future__ import annotations

from torch import nn
from torch.fx import GraphModule

from autodeploy.errors import QuantizationError
from autodeploy.export import WRAPPER_PREFIX
from autodeploy.parallel.quantized_slices import sharded_scheme
from autodeploy.parallel.slices import shards_of
from autodeploy.runtime.kv_cache import KV_SCALES_KEY
from autodeploy.quantization.checkpoint import checkpoint_format
from autodeploy.quantization.kv_scales import checkpoint_kv_scales
from autodeploy.quantization.loading import quantized_loads
from autodeploy.graph_utils import weight_bytes
from autodeploy.quantization.moe_checkpoint import (block_for, block_scheme, expert_blocks, experts_load,
                                                    record_block_name, stacked_scheme)
from autodeploy.quantization.rewrite import hf_path, linear_sites, moe_nodes, swap_linear, swap_moe
from autodeploy.export import WRAPPER_PREFIX
from autodeploy.parallel.slices import shards_of
from autodeploy.patterns.helpers import bind_args

from .registry import Stage, Transform, TransformContext, register


def _expert_parallel_size(ctx: TransformContext) -> int:
    settings = ctx.parallel
    return settings.tensor_parallel_size if settings is not None and settings.enable_expert_parallel else 1


@register
class QuantizeFromCheckpoint(Transform):
    name = "quantize_from_checkpoint"
    stage = Stage.QUANTIZATION

    def apply(self, gm: GraphModule, ctx: TransformContext) -> dict[str, int]:
        fmt = checkpoint_format(ctx.source)
        if fmt is None:
            return {}
        loads = quantized_loads(gm)
        shards = shards_of(gm)  # this rank's slice of each weight (tensor parallelism)
        counts = {"weight_bytes_before": weight_bytes(gm)}
        for site in list(linear_sites(gm)):
            scheme = fmt.scheme_for(site.path)
            if scheme is None:
                continue
            self._check_requested(ctx.quantization.algo, fmt.describe(scheme), scheme.name)
            weight = site.node.args[1].target.removeprefix(WRAPPER_PREFIX)
            shard = shards.get(weight)
            scheme = sharded_scheme(scheme, shard, site.path)
            scheme.check(site.in_features)
            params = swap_linear(site, scheme, ctx.dtype)
            source = weight if shard is not None and shard.key else site.path  # a fused part: its own slices
            loads.add(fmt.layer_load(source, scheme, site.out_features, site.in_features, ctx.dtype, params))
            kind = f"{fmt.method}_{scheme.name}_linear"
            counts[kind] = counts.get(kind, 0) + 1
        self._experts(gm, ctx, fmt, counts)
        counts["weight_bytes_after"] = weight_bytes(gm)
        kv_scales = checkpoint_kv_scales(gm, fmt.keys, ctx.source.weight_files)
        if kv_scales is not None:
            gm.meta[KV_SCALES_KEY] = kv_scales
            counts["kv_cache_scales"] = len(kv_scales)
        return counts

    def _experts(self, gm: GraphModule, ctx: TransformContext, fmt, counts: dict[str, int]) -> None:
        """MoE layers whose experts the checkpoint stores quantized, per expert: stacked as stored."""
        blocks, shards, loads = expert_blocks(fmt.keys), shards_of(gm), quantized_loads(gm)
        for prefix, module, node in list(moe_nodes(gm)):
            args = bind_args(node)
            path = hf_path(args["w_gate_up"].target)
            block = block_for(path, blocks)
            scheme = block_scheme(fmt, block) if block is not None else None
            if scheme is None:
                continue
            self._check_requested(ctx.quantization.algo, fmt.describe(scheme), scheme.name)
            names = {arg: (prefix + args[arg].target).removeprefix(WRAPPER_PREFIX) for arg in ("w_gate_up", "w_down")}
            shapes = {arg: tuple(args[arg].meta["val"].shape) for arg in names}
            for arg in names:
                scheme.check(shapes[arg][2])
            weight_shards = {arg: shards[name] for arg, name in names.items() if name in shards}
            stacked = stacked_scheme(scheme)
            params = {}
            for arg, (_, suffixes, _) in zip(names, swap_moe(prefix, module, node, stacked, ctx.dtype).values()):
                params.update({param: arg + suffix for param, suffix in suffixes.items()})
            loads.add(experts_load(fmt, block, scheme, shapes, weight_shards, ctx.dtype, params, shards))
            record_block_name(gm, path, block)
            kind = f"{fmt.method}_{scheme.name}_experts"
            counts[kind] = counts.get(kind, 0) + shapes["w_gate_up"][0]

    def expected(self, gm: GraphModule, ctx: TransformContext) -> dict[str, int]:
        """Every nn.Linear the checkpoint stores quantized, and every expert (the experts of this rank)."""
        fmt = checkpoint_format(ctx.source)
        counts: dict[str, int] = {}
        for path, module in ctx.meta_model.named_modules() if fmt is not None else ():
            scheme = fmt.scheme_for(path) if isinstance(module, nn.Linear) else None
            if scheme is not None:
                kind = f"{fmt.method}_{scheme.name}_linear"
                counts[kind] = counts.get(kind, 0) + 1
        for block in expert_blocks(fmt.keys).values() if fmt is not None else ():
            scheme = fmt.scheme_for(block.linear(0, "gate"))
            if scheme is not None:
                kind = f"{fmt.method}_{scheme.name}_experts"
                counts[kind] = counts.get(kind, 0) + block.experts // _expert_parallel_size(ctx)
        return counts

    @staticmethod
    def _check_requested(algo: str, stored: str, scheme_name: str) -> None:
        if algo not in ("auto", scheme_name):
            raise QuantizationError(
                f"the checkpoint is already quantized ({stored}); quantization '{algo}' contradicts it "
                f"(use auto or {scheme_name})"
            )
