"""Runs the cached graph: packed batch in, logits out."""

from __future__ import annotations

import torch
from torch.fx import GraphModule

from .batch import Chunk, PackedBatch, pack
from .kv_cache import KVCachePool, kv_cache_of


class ModelExecutor:
    def __init__(self, gm: GraphModule):
        pool = kv_cache_of(gm)
        if pool is None:
            raise ValueError("the graph has no KV cache: add the insert_kv_cache transform to the recipe")
        self.gm = gm
        self.pool: KVCachePool = pool

    @property
    def device(self) -> torch.device:
        return self.pool.device

    def pack(self, chunks: list[Chunk]) -> PackedBatch:
        return pack(chunks, self.pool.block_size, self.device)

    @torch.inference_mode()
    def forward(self, batch: PackedBatch) -> torch.Tensor:
        """Logits [T, vocab] for every token of the packed batch."""
        return self.gm(*batch.graph_args(), *self.pool.graph_inputs())[0]

    @torch.inference_mode()
    def full_logits(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Logits [b, s, vocab] of whole sequences, each prefilled into scratch blocks 0..n-1.

        The plain `(input_ids, position_ids) -> logits` view of the cached graph (agreement checks);
        it overwrites the cache, so it must not run while an engine has requests in flight.
        """
        batch, seq = input_ids.shape
        needed = -(-seq // self.pool.block_size)
        if needed > self.pool.num_blocks:
            raise ValueError(f"{seq} tokens need {needed} KV cache blocks; the pool has {self.pool.num_blocks}")
        rows = []
        for ids, pos in zip(input_ids.tolist(), position_ids.tolist()):
            rows.append(self.forward(self.pack([Chunk(ids, 0, list(range(needed)), pos)])))
        return torch.stack(rows)
