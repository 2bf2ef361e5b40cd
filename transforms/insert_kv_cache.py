"""insert_kv_cache: canonical attention -> paged cached attention; caches and metadata become inputs.

The exported graph computes logits for a padded batch and recomputes everything every step. This
rewrite gives it the packed ("flattened") interface of autodeploy/runtime/kv_cache.py: batch dim 1,
all scheduled tokens of all sequences along the sequence dim, plus the metadata that tells the one
non-token-wise op, attention, where sequences start and which cache blocks hold their past. The
cache is allocated here, once, after the weights are loaded, so its size can come from the memory
that is actually left.

`dtype: fp8` stores K and V as float8_e4m3fn (half of bf16's bytes: the pool holds ~2x the tokens)
with per-layer scales: `gm.meta["autodeploy_kv_scales"]`, one (k_scale, v_scale) per attention node
in graph order (set by the checkpoint loader when the checkpoint has them), else 1.0, vLLM's default.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Node
from torch.fx.graph import CodeGen

from autodeploy.errors import RecipeError, UnsupportedModelError, WeightLoadingError
from autodeploy.graph_utils import is_op, replace_with_call
from autodeploy.kernels.cached_attention import CACHED_ATTENTION_BACKENDS
from autodeploy.kernels.quant_format import FP8_DTYPE
from autodeploy.kernels.triton_backends import pick_backend
from autodeploy.runtime.kv_cache import (
    KV_CACHE_KEY, KV_SCALES_KEY, METADATA_INPUTS, KVCachePool, LayerCacheShape, free_memory_bytes,
)

from .insert_state_cache import state_slot_bytes
from .match_attention import UNMATCHED_KEY
from .registry import Stage, Transform, TransformConfig, TransformContext, register


@dataclass
class InsertKVCacheConfig(TransformConfig):
    block_size: int = 32  # tokens per cache block
    dtype: str = "auto"  # cache dtype: auto (the model's) | fp8 (e4m3 with per-layer scales) | a torch dtype name
    num_blocks: int = 0  # explicit pool size; 0 = size it from free memory
    # Share of the free memory the cache takes; None = 0.9 on GPU, 0.1 on CPU (the host runs
    # everything else too, and CPU runs are tests and demos).
    free_memory_fraction: float | None = None
    backend: str = "auto"  # torch | triton; auto = triton on CUDA, torch elsewhere

    def __post_init__(self):
        if self.block_size < 1 or self.num_blocks < 0:
            raise RecipeError(f"insert_kv_cache: block_size must be >= 1 and num_blocks >= 0, not {self.block_size} "
                              f"and {self.num_blocks}")
        if self.free_memory_fraction is not None and not 0 < self.free_memory_fraction <= 1:
            raise RecipeError(f"insert_kv_cache: free_memory_fraction must be in (0, 1], "
                              f"not {self.free_memory_fraction}")


def _backend(name: str, device: torch.device):
    return CACHED_ATTENTION_BACKENDS[pick_backend("cached attention", CACHED_ATTENTION_BACKENDS, name, device)]


def _cache_dtype(name: str, ctx: TransformContext) -> torch.dtype:
    if name == "auto":
        return ctx.dtype
    dtype = FP8_DTYPE if name == "fp8" else getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise RecipeError(f"insert_kv_cache: unknown cache dtype '{name}' (auto, fp8 or a torch float dtype name)")
    return dtype


def _kv_scales(gm: GraphModule, num_layers: int, dtype: torch.dtype) -> list[tuple[float, float]] | None:
    """Per-layer (k_scale, v_scale) for an fp8 cache: the loader's, else 1.0; None for other dtypes."""
    if dtype != FP8_DTYPE:
        return None
    scales = gm.meta.get(KV_SCALES_KEY)
    if scales is None:
        return [(1.0, 1.0)] * num_layers
    if len(scales) != num_layers:
        raise WeightLoadingError(f"the checkpoint has KV cache scales for {len(scales)} attention layers, "
                                 f"the model has {num_layers}")
    return [(float(k), float(v)) for k, v in scales]


def _num_blocks(cfg: InsertKVCacheConfig, bytes_per_block: int, device: torch.device) -> int:
    if cfg.num_blocks > 0:
        return cfg.num_blocks
    fraction = cfg.free_memory_fraction
    if fraction is None:
        fraction = 0.9 if device.type == "cuda" else 0.1
    blocks = int(free_memory_bytes(device) * fraction) // bytes_per_block
    if blocks < 1:
        raise MemoryError(f"no memory left for even one KV cache block ({bytes_per_block} bytes)")
    return blocks


def _layer_shape(attn: Node) -> LayerCacheShape:
    k, v = attn.args[1].meta["val"], attn.args[2].meta["val"]
    return LayerCacheShape(n_kv_heads=k.shape[1], k_head_dim=k.shape[3], v_head_dim=v.shape[3])


def _packed_interface(gm: GraphModule, num_layers: int) -> tuple[dict[str, Node], list[tuple[Node, Node]]]:
    """Switch to flat positional calling and add the metadata and cache placeholders."""
    graph = gm.graph
    graph._codegen = CodeGen()
    gm.validate_inputs = False  # export's pre-hook checks calls against the old pytree input spec
    output = next(n for n in graph.nodes if n.op == "output")
    result = output.args[0]
    while isinstance(result, (tuple, list)) and len(result) == 1:  # export's pytree output: ((logits,),)
        result = result[0]
    output.args = (result,)
    last = [n for n in graph.nodes if n.op == "placeholder"][-1]
    with graph.inserting_after(last):
        names = list(METADATA_INPUTS) + [f"{kind}_cache_{i}" for i in range(num_layers) for kind in ("k", "v")]
        nodes = []
        for name in reversed(names):  # inserting right after `last` each time: reverse keeps the order
            nodes.insert(0, graph.placeholder(name))
    meta = dict(zip(METADATA_INPUTS, nodes))
    caches = nodes[len(METADATA_INPUTS):]
    return meta, list(zip(caches[0::2], caches[1::2]))


@register
class InsertKVCache(Transform):
    name = "insert_kv_cache"
    stage = Stage.CACHE
    config_cls = InsertKVCacheConfig

    def apply(self, gm: GraphModule, ctx: TransformContext) -> dict[str, int]:
        attention = [n for n in gm.graph.nodes if is_op(n, torch.ops.autodeploy.attention)]
        state_bytes = state_slot_bytes(gm)  # each block also names a state slot (insert_state_cache)
        if not attention and not state_bytes:
            return {"cached_attention": 0}
        left = gm.meta.get(UNMATCHED_KEY, [])
        if left:  # with a cache every step runs only its new tokens: an attention left as HF's would see no others
            raise UnsupportedModelError(f"{len(left)} attention layer(s) could not become autodeploy::attention, "
                                        f"so no cache can serve the model ({left[0]})")
        cfg = self.config
        shapes = [_layer_shape(n) for n in attention]
        dtype = _cache_dtype(cfg.dtype, ctx)
        bytes_per_block = KVCachePool.bytes_per_block(shapes, cfg.block_size, dtype) + state_bytes
        num_blocks = _num_blocks(cfg, bytes_per_block, ctx.device)
        op = _backend(cfg.backend, ctx.device)

        kv_scales = _kv_scales(gm, len(attention), dtype)
        meta, caches = _packed_interface(gm, len(attention))
        for i, (node, (k_cache, v_cache)) in enumerate(zip(attention, caches)):
            q, k, v, scale, *rest = node.args
            sliding_window = rest[0] if len(rest) > 0 else node.kwargs.get("sliding_window")
            logit_cap = rest[1] if len(rest) > 1 else node.kwargs.get("logit_cap")
            alibi_slopes = rest[2] if len(rest) > 2 else node.kwargs.get("alibi_slopes")
            sinks = rest[3] if len(rest) > 3 else node.kwargs.get("sinks")
            args = (q, k, v, k_cache, v_cache, *meta.values(), scale, sliding_window, logit_cap, alibi_slopes)
            replace_with_call(gm, node, op, args + (kv_scales[i] if kv_scales else ()),
                              {"sinks": sinks} if sinks is not None else None)
        gm.meta[KV_CACHE_KEY] = KVCachePool.allocate(shapes, cfg.block_size, num_blocks, dtype, ctx.device)
        return {"cached_attention": len(attention), "cache_blocks": num_blocks}

    def expected(self, gm: GraphModule, ctx: TransformContext) -> dict[str, int]:
        return {"cached_attention": ctx.source.config.get_text_config().num_hidden_layers}
