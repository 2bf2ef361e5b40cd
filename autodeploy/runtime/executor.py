"""Runs the cached graph: packed batch in, logits out (decode steps through CUDA graphs when captured)."""

from __future__ import annotations

import warnings

import torch
from torch.fx import GraphModule

from .batch import Chunk, PackedBatch, pack
from .cuda_graphs import DecodeGraphs
from .kv_cache import KVCachePool, kv_cache_of


class ModelExecutor:
    def __init__(self, gm: GraphModule):
        pool = kv_cache_of(gm)
        if pool is None:
            raise ValueError("the graph has no KV cache: add the insert_kv_cache transform to the recipe")
        self.gm = gm
        self.pool: KVCachePool = pool
        self.graphs: DecodeGraphs | None = None

    @property
    def device(self) -> torch.device:
        return self.pool.device

    def pack(self, chunks: list[Chunk]) -> PackedBatch:
        return pack(chunks, self.pool.block_size, self.device)

    @torch.inference_mode()
    def forward(self, batch: PackedBatch) -> torch.Tensor:
        """Logits [T, vocab] for every token of the packed batch."""
        return self.gm(*batch.graph_args(), *self.pool.graph_inputs())[0]

    def capture_decode_graphs(self, sizes: list[int], max_blocks_per_seq: int, scratch_block: int) -> None:
        """Capture decode forwards for these batch sizes (CUDA only; see cuda_graphs.py).

        `scratch_block` is the cache block padding rows write to: the caller must never hand it
        to a sequence. A graph that cannot be captured (an op that syncs with the host, such as
        the torch attention backend) leaves the executor eager, with a warning."""
        if self.device.type != "cuda" or not sizes:
            return
        try:
            self.graphs = DecodeGraphs(self.forward, self.pool.block_size, self.device, sizes,
                                       max_blocks_per_seq, scratch_block)
        except RuntimeError as e:
            warnings.warn(f"CUDA graph capture failed, decode runs eagerly: {str(e).splitlines()[0]}")
            self.graphs = None

    @torch.inference_mode()
    def last_token_logits(self, chunks: list[Chunk]) -> torch.Tensor:
        """Logits [len(chunks), vocab] at each chunk's last token: replayed from a CUDA graph when
        the step is all-decode and fits a bucket, else one eager forward."""
        size = self.graphs.bucket_for(chunks) if self.graphs is not None else None
        if size is not None:
            return self.graphs.run(chunks, size)
        batch = self.pack(chunks)
        return self.forward(batch)[batch.last_token_rows]

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
