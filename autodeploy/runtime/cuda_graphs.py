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
        self._alloc_buffers(max(sizes))
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._logits: dict[int, torch.Tensor] = {}
        self._capture(forward, sorted(sizes, reverse=True))

    def _alloc_buffers(self, n: int) -> None:
        """Static device inputs for up to n rows, and pinned host mirrors, so that a step's metadata
        goes over in three asynchronous copies: [input_ids | position_ids | slot_mapping] (int64),
        [cu_seqlens | seq_lens] (int32) and the used corner of the block table. Reusing the host
        mirrors each step is safe because every step ends in a host sync (the sampler's .tolist())
        after the replay that read them."""
        device, pin = self.device, self.device.type == "cuda"
        self._dev64 = torch.zeros(3 * n, dtype=torch.long, device=device)
        self._dev32 = torch.zeros(2 * n + 1, dtype=torch.int32, device=device)
        self._static = PackedBatch(
            input_ids=self._dev64[:n].view(1, n),
            position_ids=self._dev64[n:2 * n].view(1, n),
            cu_seqlens=self._dev32[:n + 1],
            seq_lens=self._dev32[n + 1:],
            block_tables=torch.zeros(n, self.max_blocks_per_seq, dtype=torch.int32, device=device),
            slot_mapping=self._dev64[2 * n:],
        )
        self._host64 = torch.zeros(3, n, dtype=torch.long, pin_memory=pin)
        self._host32 = torch.zeros(2 * n + 1, dtype=torch.int32, pin_memory=pin)
        self._host_tables = torch.zeros(n * self.max_blocks_per_seq, dtype=torch.int32, pin_memory=pin)
        self._np64, self._np32, self._np_tables = self._host64.numpy(), self._host32.numpy(), self._host_tables.numpy()
        self._np32[:n + 1] = range(n + 1)  # decode steps: one token per sequence, always

    @property
    def sizes(self) -> list[int]:
        return sorted(self._graphs)

    def _view(self, size: int) -> PackedBatch:
        s = self._static
        return PackedBatch(s.input_ids[:, :size], s.position_ids[:, :size], s.cu_seqlens[:size + 1],
                           s.seq_lens[:size], s.block_tables[:size], s.slot_mapping[:size])

    def _load(self, chunks: list[Chunk], size: int) -> None:
        """Write `chunks` (one token each) padded to `size` rows into the pinned host mirrors and
        copy them into the static buffers (3 host->device copies). Padding rows are one-token
        sequences in the scratch block (context 1, slot scratch_block * block_size)."""
        n, bs, count = self._static.seq_lens.shape[0], self.block_size, len(chunks)
        starts = [c.start for c in chunks]
        pad_block = self._pad.block_ids[0]
        tables = [c.block_ids for c in chunks]
        width = max(map(len, tables)) if chunks else 1
        h64, h32 = self._np64, self._np32
        h64[0, :count] = [c.token_ids[0] for c in chunks]
        h64[1, :count] = starts
        h64[2, :count] = [t[p // bs] * bs + p % bs for t, p in zip(tables, starts)]
        h32[n + 1:n + 1 + count] = [p + 1 for p in starts]
        if size > count:
            h64[0:2, count:size] = 0
            h64[2, count:size] = pad_block * bs
            h32[n + 1 + count:n + 1 + size] = 1
        grid = self._np_tables[:size * width].reshape(size, width)
        grid[:] = 0
        for row, t in zip(grid, tables):
            row[:len(t)] = t
        grid[count:, 0] = pad_block
        self._dev64.copy_(self._host64.view(-1), non_blocking=True)  # a few KiB: whole buffers stay contiguous
        self._dev32.copy_(self._host32, non_blocking=True)
        self._static.block_tables[:size, :width].copy_(self._host_tables[:size * width].view(size, width),
                                                        non_blocking=True)

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
