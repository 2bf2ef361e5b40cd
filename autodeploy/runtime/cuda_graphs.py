"""CUDA graphs for decode steps: one captured forward per batch-size bucket, replayed every step.

An eager decode step of the cached graph is hundreds of small kernel launches, each behind Python
dispatch (FX code, custom-op wrappers); at batch 1 the GPU mostly waits for the host. A step in
which every sequence decodes has a shape fixed by the batch size alone (T = B), so we capture the
forward once per bucket (1, 2, 4, ..., 256 by default) and replay it: one launch per step.

Each bucket's graph reads its inputs from static buffers (shared by all buckets: a bucket uses the
first rows), so a step packs on the host, copies into those buffers and replays. A batch of n
sequences runs in the smallest bucket >= n; the padding rows are one-token sequences whose K/V go
to a scratch block that the block manager never hands out, so they cannot touch a real sequence's
cache, and their logits are dropped. The block-table buffer is as wide as the longest sequence the
engine admits (max blocks per sequence); the attention kernel reads only the blocks a sequence's
length covers, so stale entries past a row's width are harmless. Prefill and mixed steps (shapes
vary with the prompts) run eagerly.
"""

from __future__ import annotations

from typing import Callable

import torch

from .batch import Chunk, PackedBatch, pack

DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)

Forward = Callable[[PackedBatch], torch.Tensor]  # packed batch -> logits [T, vocab]


def buckets_to_capture(batch_sizes: tuple[int, ...], max_batch_size: int, max_num_tokens: int) -> list[int]:
    """The requested sizes a decode step can use: up to the first one that holds max_batch_size
    sequences (larger ones would never run), and none above the forward's token budget."""
    sizes = sorted({s for s in batch_sizes if 0 < s <= max_num_tokens})
    covering = [s for s in sizes if s >= max_batch_size]
    return [s for s in sizes if s < max_batch_size] + covering[:1]


class DecodeGraphs:
    """Captured decode forwards for each bucket size, and the static buffers they read."""

    def __init__(self, forward: Forward, block_size: int, device: torch.device, sizes: list[int],
                 max_blocks_per_seq: int, scratch_block: int):
        if not sizes:
            raise ValueError("no CUDA graph batch sizes to capture")
        self.block_size = block_size
        self.device = device
        self.max_blocks_per_seq = max_blocks_per_seq
        self._pad = Chunk([0], 0, [scratch_block])  # a one-token sequence living in the scratch block
        n = max(sizes)
        self._static = PackedBatch(
            input_ids=torch.zeros(1, n, dtype=torch.long, device=device),
            position_ids=torch.zeros(1, n, dtype=torch.long, device=device),
            cu_seqlens=torch.zeros(n + 1, dtype=torch.int32, device=device),
            seq_lens=torch.zeros(n, dtype=torch.int32, device=device),
            block_tables=torch.zeros(n, max_blocks_per_seq, dtype=torch.int32, device=device),
            slot_mapping=torch.zeros(n, dtype=torch.long, device=device),
        )
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._logits: dict[int, torch.Tensor] = {}
        self._capture(forward, sorted(sizes, reverse=True))

    @property
    def sizes(self) -> list[int]:
        return sorted(self._graphs)

    def _view(self, size: int) -> PackedBatch:
        s = self._static
        return PackedBatch(s.input_ids[:, :size], s.position_ids[:, :size], s.cu_seqlens[:size + 1],
                           s.seq_lens[:size], s.block_tables[:size], s.slot_mapping[:size])

    def _load(self, chunks: list[Chunk], size: int) -> None:
        """Pack `chunks` padded to `size` rows on the host and copy them into the static buffers."""
        host = pack(chunks + [self._pad] * (size - len(chunks)), self.block_size, torch.device("cpu"))
        view = self._view(size)
        for name in ("input_ids", "position_ids", "cu_seqlens", "seq_lens", "slot_mapping"):
            getattr(view, name).copy_(getattr(host, name), non_blocking=True)
        view.block_tables[:, :host.block_tables.shape[1]].copy_(host.block_tables, non_blocking=True)

    @torch.inference_mode()
    def _capture(self, forward: Forward, sizes: list[int]) -> None:
        """Largest bucket first, all in one memory pool, so smaller graphs reuse its memory.

        Each bucket runs twice on a side stream before capture (Triton compiles and autotunes
        there, cuBLAS picks its kernels), as CUDA graph capture requires."""
        pool = torch.cuda.graph_pool_handle()
        for size in sizes:
            self._load([], size)  # every row a padding row: the capture writes only the scratch block
            view = self._view(size)
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(2):
                    forward(view)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._logits[size] = forward(view)
            self._graphs[size] = graph
        torch.cuda.synchronize(self.device)

    def bucket_for(self, chunks: list[Chunk]) -> int | None:
        """The bucket that runs this step, or None when it must run eagerly (not all-decode, too
        many sequences, or a block table wider than the buffer)."""
        if any(len(c.token_ids) != 1 for c in chunks):
            return None
        if max(len(c.block_ids) for c in chunks) > self.max_blocks_per_seq:
            return None
        return next((s for s in self.sizes if s >= len(chunks)), None)

    def run(self, chunks: list[Chunk], size: int) -> torch.Tensor:
        """Next-token logits [len(chunks), vocab]: a view of the graph's output, valid until the
        next replay."""
        self._load(chunks, size)
        self._graphs[size].replay()
        return self._logits[size][:len(chunks)]
