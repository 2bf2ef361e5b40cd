"""match_attention: HF attention (sdpa or eager form) -> autodeploy::attention.

The graph gives q, un-repeated k/v and the scale. The HF mask is dropped (the canonical op is causal
by definition), so what the mask encoded is read from the HF attention module instead: whether it is
causal at all (`is_causal`; non-causal modules are left alone) and its sliding window (or, for a module without
one, from a constant causal-band mask buffer the scores are masked with: GPT-Neo's local layers). The scale
and the soft cap come from the graph, which is what the model computes (HF's sdpa path refuses a
soft cap, so only the eager form has one). Terms added to the scores are evaluated
(`patterns/position_bias.py`): ALiBi becomes the op's `alibi_slopes` (a constant buffer of the
graph); an attention with another kind of additive bias is left alone (and counted as unmatched). Attention
sinks (GPT-OSS, Granite-MoE SWA) become the op's `sinks`: the model's own [n_heads] parameter.
"""

from __future__ import annotations

import re

import torch
from torch import nn
from torch.fx import GraphModule, Node

from autodeploy.export import WRAPPER_PREFIX
from autodeploy.loading import initial_buffers
from autodeploy.graph_utils import get_submodule_or_none, is_op, module_path
from autodeploy.kernels.attention import causal_mask
from autodeploy.patterns.attention import AttentionMatch, match_attention
from autodeploy.patterns.helpers import val
from autodeploy.patterns.position_bias import UnsupportedBias, alibi_slopes

from ._rewrite import replace_matches
from .registry import Stage, Transform, TransformContext, register


UNMATCHED_KEY = "autodeploy_unmatched_attention"  # gm.meta: attentions seen and left alone, with why


def _layer_index(module: nn.Module | None, path: str | None) -> int | None:
    index = getattr(module, "layer_idx", None)
    if index is None and path is not None:
        found = re.search(r"\.(\d+)\.", path)
        index = int(found.group(1)) if found else None
    return index


def sliding_window(module: nn.Module | None, path: str | None, config) -> int | None:
    """The window of the attention at `path`: the module's own attribute (Qwen2/3, Gemma 2/3), else
    the config's layer_types (per-layer), else config.sliding_window (Mistral, Phi-3)."""
    if module is not None and hasattr(module, "sliding_window"):
        return module.sliding_window
    layer_types = getattr(config, "layer_types", None)
    index = _layer_index(module, path)
    if layer_types and index is not None:
        return config.sliding_window if layer_types[index] == "sliding_attention" else None
    if getattr(config, "use_sliding_window", True) is False:
        return None
    return getattr(config, "sliding_window", None)


def band_window(match: AttentionMatch, buffers: dict[str, torch.Tensor]) -> int | None:
    """The sliding window a constant mask buffer of the module encodes (GPT-Neo's per-layer `bias`, sliced by
    where(bias[..., k - q:k, :k], scores, min)): a causal band [.., P, P] whose rows keep at most W keys gives
    W; a plain causal buffer, or none, gives None. `buffers`: the values of the model's computed buffers."""
    for keep in match.kept_where:
        while is_op(keep, torch.ops.aten.slice):
            keep = keep.args[0]
        if not (isinstance(keep, Node) and keep.op == "get_attr"):
            continue
        mask = buffers.get(keep.target.removeprefix(WRAPPER_PREFIX))
        if mask is None or mask.dtype != torch.bool or mask.dim() < 2 or mask.shape[-1] != mask.shape[-2]:
            continue
        mask = mask.reshape(-1, *mask.shape[-2:])[0]
        width = int(mask[-1].sum())
        size = mask.shape[-1]
        if width < size and torch.equal(mask.cpu(), causal_mask(size, size, width, torch.device("cpu"))):
            return width
    return None


def slopes_node(match: AttentionMatch) -> Node | None:
    """The ALiBi slopes of `match` as a graph constant (None without ALiBi); UnsupportedBias for other biases."""
    slopes = alibi_slopes(match.additive_terms, val(match.q).shape[1])
    if slopes is None:
        return None
    graph = match.output.graph
    module = graph.owning_module
    index = sum(1 for name, _ in module.named_buffers() if name.startswith("alibi_slopes_"))
    module.register_buffer(f"alibi_slopes_{index}", slopes)
    with graph.inserting_before(match.output):
        node = graph.get_attr(f"alibi_slopes_{index}")
    node.meta["val"] = val(match.q).new_empty(slopes.shape, dtype=torch.float32)
    return node


@register
class MatchAttention(Transform):
    name = "match_attention"
    stage = Stage.PATTERN

    def apply(self, gm: GraphModule, ctx: TransformContext) -> dict[str, int]:
        config = ctx.source.config.get_text_config()
        buffers = initial_buffers(ctx.meta_model)

        left: list[str] = gm.meta.setdefault(UNMATCHED_KEY, [])

        def operands(match: AttentionMatch) -> tuple | None:
            path = module_path(match.output)
            hf_attention = get_submodule_or_none(ctx.meta_model, path, prefix=WRAPPER_PREFIX)
            if not getattr(hf_attention, "is_causal", True):
                left.append(f"{path}: not causal")
                return None
            window = sliding_window(hf_attention, path, config) or band_window(match, buffers)
            try:
                slopes = slopes_node(match)
            except UnsupportedBias as e:
                left.append(f"{path}: {e}")
                return None
            operands = (match.q, match.k, match.v, match.scale, window, match.logit_cap)
            if match.sinks is not None:
                return (*operands, slopes, match.sinks)
            return operands if slopes is None else (*operands, slopes)

        count = replace_matches(gm, match_attention, torch.ops.autodeploy.attention.default, operands)
        return {"attention": count}

    def expected(self, gm: GraphModule, ctx: TransformContext) -> dict[str, int]:
        return {"attention": ctx.source.config.get_text_config().num_hidden_layers}
