"""The cached graph's interface and its paged KV cache tensors.

`insert_kv_cache` turns `(input_ids, position_ids) -> logits` into a graph called with flat
positional arguments, in this order:

    input_ids [1, T], position_ids [1, T],            all new tokens of all scheduled sequences
    cu_seqlens int32 [B+1], seq_lens int32 [B],       see kernels/cached_attention.py
    block_tables int32 [B, max_blocks], slot_mapping int64 [T],
    k_cache_0, v_cache_0, k_cache_1, v_cache_1, ...   one pair per attention layer
        each [num_blocks, block_size, n_kv_heads, head_dim], in the cache dtype (float8_e4m3fn for
        an fp8 cache: one byte per element, so the same memory holds twice bf16's blocks)
    logit_rows int64 [R]                              only after gather_lm_head_rows (LOGIT_ROWS_KEY): the
                                                      rows whose logits are wanted, increasing (R == T: all)
  -> logits [1, T, vocab], or [1, R, vocab] with logit_rows

The cache tensors are allocated once by the transform and travel with the graph in
`gm.meta[KV_CACHE_KEY]`, so whoever runs the graph (the executor) finds them there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx import GraphModule

KV_CACHE_KEY = "autodeploy_kv_cache"
STATE_SLOTS_KEY = "autodeploy_state_slots"  # set when a sequence's first block also names its SSM state slot
# gm.meta key of an fp8 cache's per-layer (k_scale, v_scale), in attention order (set by the loader)
KV_SCALES_KEY = "autodeploy_kv_scales"
METADATA_INPUTS = ("cu_seqlens", "seq_lens", "block_tables", "slot_mapping")
LOGIT_ROWS_KEY = "autodeploy_logit_rows"  # set when the graph takes `logit_rows` last (gather_lm_head_rows)


@dataclass(frozen=True)
class LayerCacheShape:
    n_kv_heads: int
    k_head_dim: int
    v_head_dim: int


@dataclass
class KVCachePool:
    """Every attention layer's paged K and V cache, sharing one block numbering."""

    block_size: int
    num_blocks: int
    k_caches: list[torch.Tensor]
    v_caches: list[torch.Tensor]
    device: torch.device  # a field, not the caches' device: a state-space model has no K/V caches at all

    @staticmethod
    def bytes_per_block(layers: list[LayerCacheShape], block_size: int, dtype: torch.dtype) -> int:
        per_token = sum(s.n_kv_heads * (s.k_head_dim + s.v_head_dim) for s in layers)
        return per_token * block_size * dtype.itemsize

    @classmethod
    def allocate(cls, layers: list[LayerCacheShape], block_size: int, num_blocks: int,
                 dtype: torch.dtype, device: torch.device) -> "KVCachePool":
        def alloc(heads: int, dim: int) -> torch.Tensor:
            return torch.zeros(num_blocks, block_size, heads, dim, dtype=dtype, device=device)

        return cls(block_size, num_blocks,
                   [alloc(s.n_kv_heads, s.k_head_dim) for s in layers],
                   [alloc(s.n_kv_heads, s.v_head_dim) for s in layers], torch.device(device))

    def graph_inputs(self) -> list[torch.Tensor]:
        return [c for pair in zip(self.k_caches, self.v_caches) for c in pair]


def kv_cache_of(gm: GraphModule) -> KVCachePool | None:
    """The pool of a graph that went through `insert_kv_cache`, else None (the plain interface)."""
    return gm.meta.get(KV_CACHE_KEY)


def free_memory_bytes(device: torch.device) -> int:
    """Free memory where the cache will live: the GPU's free memory, or the host's MemAvailable."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("cannot tell the free host memory (no MemAvailable in /proc/meminfo)")
