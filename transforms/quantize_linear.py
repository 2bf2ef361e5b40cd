"""quantize_linear: quantize an unquantized checkpoint's linears and MoE experts while they load.

`quantization.algo` (fp8 | int8 | int4, recipe section, `LLM(quantization=...)`, `--quantization`)
picks the scheme; every autodeploy::linear becomes fp8_linear / int_linear and every
autodeploy::moe becomes fp8_moe / int_moe, except modules matching `quantization.exclude` (by
default lm_head and MoE routers, which users expect kept: the head decides every token, routers are
tiny and decide which experts run); a linear whose weight another op also reads (an LM head tied to the
embedding table) stays unquantized, with a warning. The weights are not touched here: the new parameters are meta
placeholders, and `load_weights` quantizes each layer as it streams (see autodeploy/quantization/loading.py).
A pre-quantized checkpoint is left to quantize_from_checkpoint.

Group sizes (int4 / int8): an explicit `quantization.group_size` must divide every quantized linear's
in_features (else a one-line error naming the linear and the sizes that would); left unset, int8 is
per channel and int4 group 128, and a linear 128 does not divide takes the largest of 64 / 32 that
does, listed in a warning (settings.py, DEFAULT_GROUP_SIZES).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import replace
from functools import partial

from torch import nn
from torch.fx import GraphModule

from autodeploy.errors import QuantizationError
from autodeploy.export import WRAPPER_PREFIX
from autodeploy.graph_utils import weight_bytes
from autodeploy.parallel.quantized_slices import check_whole_blocks
from autodeploy.parallel.rank_reduce import combine_over_ranks
from autodeploy.parallel.slices import shards_of
from autodeploy.patterns.moe import stored_expert_weight
from autodeploy.quantization.checkpoint import checkpoint_format
from autodeploy.quantization.loading import LayerLoad, quantized_loads
from autodeploy.quantization.rewrite import (hf_path, linear_sites, moe_nodes, quantize_experts, swap_linear,
                                             swap_moe)
from autodeploy.quantization.schemes import LinearScheme, online_scheme

from .registry import Stage, Transform, TransformConfig, TransformContext, register


def _build_linear(scheme, key: str, scale_dtype, combine, tensors: dict) -> dict:
    return scheme.quantize(tensors[key], scale_dtype, combine)


def _build_experts(scheme, key: str, scale_dtype, combine, transposed: bool, tensors: dict) -> dict:
    w = tensors[key]
    return quantize_experts(scheme, w.transpose(1, 2) if transposed else w, scale_dtype, combine)


def _row_combine(shard, in_dim: int):
    """For a weight sharded along its in-features (row-parallel, or the down weights of TP inside
    experts): combine_over_ranks, so its fp8 row scales span every rank's slice of K, as at TP 1."""
    return combine_over_ranks if shard is not None and shard.dim == in_dim else None


@register
class QuantizeLinear(Transform):
    name = "quantize_linear"
    stage = Stage.QUANTIZATION

    def __init__(self, config: TransformConfig | None = None):
        super().__init__(config)
        self._fallbacks: dict[str, int] = {}  # module path -> the default group size it fell back to

    def apply(self, gm: GraphModule, ctx: TransformContext) -> dict[str, int]:
        settings = ctx.quantization
        fmt = checkpoint_format(ctx.source)
        if settings.online and fmt is not None and fmt.dequantized_on_load:
            raise QuantizationError(f"quantization '{settings.algo}' on a {fmt.method} checkpoint is not supported: "
                                    "its experts are dequantized as they load; leave quantization.algo at auto")
        if not settings.online or fmt is not None:
            return {}
        scheme = online_scheme(settings)
        counts = {f"{scheme.name}_linear": 0, f"{scheme.name}_experts": 0, "excluded": 0,
                  "weight_bytes_before": weight_bytes(gm)}
        self._linears(gm, ctx, scheme, counts)
        self._experts(gm, ctx, scheme, counts)
        counts["weight_bytes_after"] = weight_bytes(gm)
        if self._fallbacks:
            counts["group_size_fallbacks"] = len(self._fallbacks)
            self._warn_fallbacks(settings.nominal_group_size)
        return counts

    def _sized(self, scheme: LinearScheme, settings, name: str, *in_features: int) -> LinearScheme:
        """`scheme` with the group size of weights with these in_features (one size for all: MoE experts)."""
        if scheme.kind != "int":
            return scheme
        group = min(settings.group_size_for(k, name) for k in in_features)  # defaults: each divides the larger
        if group != settings.nominal_group_size:
            self._fallbacks[name] = group
        return replace(scheme, group_size=group)

    def _warn_fallbacks(self, nominal: int) -> None:
        """One line: the linears (layer indices folded to *) and the group size each took instead."""
        folded = {re.sub(r"\.\d+(?=\.|$)", ".*", name): group for name, group in self._fallbacks.items()}
        listed = ", ".join(f"{name} ({group})" for name, group in folded.items())
        self.warnings.append(f"quantize_linear: group size {nominal} does not divide the in_features of "
                             f"{len(self._fallbacks)} linears; they use the largest default that does: {listed}")

    def _linears(self, gm: GraphModule, ctx: TransformContext, base: LinearScheme, counts: dict[str, int]) -> None:
        loads = quantized_loads(gm)
        shards = shards_of(gm)  # this rank's slice of each weight (tensor parallelism)
        shared = []
        for site in list(linear_sites(gm)):
            if ctx.quantization.excluded(site.path):
                counts["excluded"] += 1
                continue
            if site.shared:
                shared.append(site.path)
                continue
            scheme = self._sized(base, ctx.quantization, site.path, site.in_features)
            scheme.check(site.in_features)
            key = (site.prefix + site.node.args[1].target).removeprefix(WRAPPER_PREFIX)
            check_whole_blocks(scheme, shards.get(key), site.path)
            params = swap_linear(site, scheme, ctx.dtype)
            shape = (site.out_features, site.in_features)
            combine = _row_combine(shards.get(key), 1)
            loads.add(LayerLoad({key: shape}, partial(_build_linear, scheme, key, ctx.dtype, combine), params))
            counts[f"{scheme.name}_linear"] += 1
        if shared:
            counts["shared_weight"] = len(shared)
            self.warnings.append(f"quantize_linear: {', '.join(shared)} left unquantized: the weight is shared with "
                                 "another op (tied word embeddings)")

    def _experts(self, gm: GraphModule, ctx: TransformContext, base: LinearScheme, counts: dict[str, int]) -> None:
        loads = quantized_loads(gm)
        shards = shards_of(gm)
        for prefix, module, node in list(moe_nodes(gm, transposed=True)):
            w_gate_up, w_down = node.args[3], node.args[4]
            path = hf_path(stored_expert_weight(w_gate_up)[0].target)
            if ctx.quantization.excluded(path):
                counts["excluded"] += 1
                continue
            scheme = self._sized(base, ctx.quantization, path, *(w.meta["val"].shape[-1] for w in (w_gate_up, w_down)))
            for weight in (w_gate_up, w_down):
                scheme.check(weight.meta["val"].shape[-1])
                stored = stored_expert_weight(weight)[0]
                shard = shards.get((prefix + stored.target).removeprefix(WRAPPER_PREFIX))
                if shard is not None and shard.dim > 0:  # TP inside experts: rows or columns of each expert
                    check_whole_blocks(scheme, shard, hf_path(stored.target))
            counts[f"{scheme.name}_experts"] += w_gate_up.meta["val"].shape[0]
            for weight_name, (shape, params, transposed) in swap_moe(prefix, module, node, scheme, ctx.dtype).items():
                key = weight_name.removeprefix(WRAPPER_PREFIX)
                combine = _row_combine(shards.get(key), 1 if transposed else 2)
                stored_shape = (shape[0], shape[2], shape[1]) if transposed else shape
                loads.add(LayerLoad({key: stored_shape}, partial(_build_experts, scheme, key, ctx.dtype, combine,
                                                                 transposed), params))

    def expected(self, gm: GraphModule, ctx: TransformContext) -> dict[str, int]:
        """Every nn.Linear not excluded whose weight no other module shares (tied embeddings stay unquantized;
        transposed weights are kept and show up as a shortfall)."""
        settings = ctx.quantization
        if not settings.online or checkpoint_format(ctx.source) is not None:
            return {}
        owners = Counter(id(p) for _, p in ctx.meta_model.named_parameters(remove_duplicate=False))
        kept = sum(isinstance(m, nn.Linear) and not settings.excluded(p) and owners[id(m.weight)] == 1
                   for p, m in ctx.meta_model.named_modules())
        return {f"{online_scheme(settings).name}_linear": kept}
