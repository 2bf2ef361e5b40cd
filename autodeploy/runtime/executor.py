"""Runs the cached graph: packed batch in, logits out (through CUDA graphs when a bucket holds the step).

Nothing here waits for the device. The tokens a step samples stay on the device (`remember`), and
the next step takes its placeholder tokens from there (`Chunk.feed_row`), so the engine can lay
out step n + 1 while step n runs.
"""

from __future__ import annotations

import warnings
from dataclasses import replace

import torch
from torch.fx import GraphModule

from .batch import Chunk, PackedBatch, pack
from .cuda_graphs import Bucket, StepGraphs
from .kv_cache import LOGIT_ROWS_KEY, KVCachePool, kv_cache_of


class ModelExecutor:
    def __init__(self, gm: GraphModule, max_batch_size: int = 256):
        pool = kv_cache_of(gm)
        if pool is None:
            raise ValueError("the graph has no KV cache: add the insert_kv_cache transform to the recipe")
        self.gm = gm
        self.pool: KVCachePool = pool
        self.graphs: StepGraphs | None = None
        self._sampled = torch.zeros(max_batch_size, dtype=torch.long, device=self.device)
        self._takes_rows = bool(gm.meta.get(LOGIT_ROWS_KEY))  # the graph's LM head projects `logit_rows` only
        self._every_row = torch.arange(0, device=self.device)  # sliced to T: "all rows" without a kernel

    @property
    def device(self) -> torch.device:
        return self.pool.device

    def pack(self, chunks: list[Chunk]) -> PackedBatch:
        return pack(chunks, self.pool.block_size, self.device)

    @torch.inference_mode()
    def forward(self, batch: PackedBatch, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [R, vocab] at `rows` (int64, increasing) of the packed tokens; None: every token."""
        args = (*batch.graph_args(), *self.pool.graph_inputs())
        if not self._takes_rows:
            logits = self.gm(*args)[0]
            return logits if rows is None else logits[rows]
        return self.gm(*args, rows if rows is not None else self._all_rows(batch.input_ids.shape[1]))[0]

    def _all_rows(self, num_tokens: int) -> torch.Tensor:
        if self._every_row.shape[0] < num_tokens:
            self._every_row = torch.arange(max(num_tokens, 2 * self._every_row.shape[0]), device=self.device)
        return self._every_row[:num_tokens]

    @torch.inference_mode()
    def _last_token_logits(self, batch: PackedBatch) -> torch.Tensor:
        """Logits [B, vocab] at each sequence's last token, placeholder tokens fed from the device."""
        if batch.feed is not None:
            fed = self._sampled[batch.feed.clamp(min=0)]
            batch = replace(batch, input_ids=torch.where(batch.feed >= 0, fed, batch.input_ids[0])[None])
        one_token_each = batch.input_ids.shape[1] == batch.seq_lens.shape[0]
        return self.forward(batch, None if one_token_each else batch.last_token_rows)

    def remember(self, tokens: torch.Tensor) -> None:
        """Keep this step's sampled tokens [n] on the device for the next step's `feed_row`s."""
        self._sampled[:tokens.shape[0]].copy_(tokens)

    def capture_graphs(self, buckets: list[Bucket], max_blocks_per_seq: int, scratch_block: int) -> None:
        """Capture the step forward for these buckets (CUDA only; see cuda_graphs.py).

        `scratch_block` is the cache block padding writes to: the caller must never hand it to a
        sequence. A graph that cannot be captured (an op that syncs with the host, such as the
        torch attention backend) leaves the executor eager, with a warning."""
        if self.device.type != "cuda" or not buckets:
            return
        self._all_rows(max(b.tokens for b in buckets))  # grown here, not inside a capture
        try:
            self.graphs = StepGraphs(self._last_token_logits, self.pool.block_size, self.device, buckets,
                                     max_blocks_per_seq, scratch_block)
        except RuntimeError as e:
            warnings.warn(f"CUDA graph capture failed, steps run eagerly: {str(e).splitlines()[0]}")
            self.graphs = None

    def last_token_logits(self, chunks: list[Chunk]) -> torch.Tensor:
        """Logits [len(chunks), vocab] at each chunk's last token: replayed from a CUDA graph when
        a bucket holds the step, else one eager forward. Asynchronous."""
        bucket = self.graphs.bucket_for(chunks) if self.graphs is not None else None
        if bucket is not None:
            return self.graphs.run(chunks, bucket)
        return self._last_token_logits(self.pack(chunks))

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
