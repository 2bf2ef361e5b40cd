"""KV-cache scales a pre-quantized checkpoint carries, per attention layer, for an FP8 cache.

The cache stores k / k_scale and reads cache * k_scale (vLLM's convention). Where the scalars live:
compressed-tensors (kv_cache_scheme, written by llm-compressor) on the attention module,
`<attn>.k_scale` / `<attn>.v_scale`; ModelOpt (kv_cache_quant_algo FP8) on the projections,
`<attn>.k_proj.k_scale` / `<attn>.v_proj.v_scale`. They are read here, before the weights load,
because insert_kv_cache builds the cache ops with them as constants.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule

from autodeploy.export import WRAPPER_PREFIX
from autodeploy.graph_utils import is_op, module_path

_CANDIDATES = (("{}.k_scale", "{}.v_scale"), ("{}.k_proj.k_scale", "{}.v_proj.v_scale"))


def checkpoint_kv_scales(gm: GraphModule, keys: frozenset[str], files) -> list[tuple[float, float]] | None:
    """(k_scale, v_scale) per attention node in graph order, or None unless every layer has both."""
    paths = [(module_path(n) or "").removeprefix(WRAPPER_PREFIX)
             for n in gm.graph.nodes if is_op(n, torch.ops.autodeploy.attention)]
    found = []
    for path in paths:
        pair = next(((k.format(path), v.format(path)) for k, v in _CANDIDATES
                     if k.format(path) in keys and v.format(path) in keys), None)
        if pair is None:
            return None
        found.append(pair)
    if not found:
        return None
    values = _read_scalars(files, {key for pair in found for key in pair})
    return [(values[k], values[v]) for k, v in found]


def _read_scalars(files, wanted: set[str]) -> dict[str, float]:
    from safetensors import safe_open

    values = {}
    for f in files:
        with safe_open(str(f), framework="pt") as handle:
            for key in wanted & set(handle.keys()):
                values[key] = float(handle.get_tensor(key).float().reshape(-1)[0])
    return values
