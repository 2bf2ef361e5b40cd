"""CUDA graphs for whole steps: one captured forward per shape bucket, replayed every step.

An eager step of the cached graph is hundreds of small kernel launches, each behind Python
dispatch (FX code, custom-op wrappers): at batch 1 the GPU mostly waits for the host, and a
128-token prefill spends ~30 ms launching. So each step shape in a small set of buckets is
captured once and replayed: one launch per step.

A bucket is (tokens T, sequences B):
  - decode buckets (B, B) for the batch sizes (1, 2, 4, ..., 256 by default): every sequence
    runs one token. T == B also picks the decode attention kernel, fixed at capture.
  - prefill buckets (T, min(max_batch_size + 1, T // 2)) for token counts (32 ... 2048): prompt
    chunks, mixed with decodes. B < T keeps them off the decode kernel, and the + 1 leaves room
    for the padding sequence.
A step runs in the smallest bucket that holds it (batch.py pads it), or eagerly if none does.

Each graph reads static input buffers, shared by all buckets (a bucket uses their first rows), and
outputs the logits at each sequence's last token. A step lays its batch out on the host, copies it
into pinned mirrors (two, used in turn: the copy of step n may still be queued while step n + 1 is
laid out) and from there into the static buffers in three asynchronous copies, then replays.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .batch import Chunk, HostLayout, PackedBatch, lay_out, padding

Forward = Callable[[PackedBatch], torch.Tensor]  # packed batch -> logits at the last tokens [B, vocab]


def buckets_to_capture(batch_sizes: tuple[int, ...], max_batch_size: int, max_num_tokens: int) -> list[int]:
    """The requested sizes a decode step can use: up to the first one that holds max_batch_size
    sequences (larger ones would never run), and none above the forward's token budget."""
    sizes = sorted({s for s in batch_sizes if 0 < s <= max_num_tokens})
    covering = [s for s in sizes if s >= max_batch_size]
    return [s for s in sizes if s < max_batch_size] + covering[:1]


@dataclass(frozen=True, order=True)
class Bucket:
    tokens: int
    seqs: int

    @property
    def decode(self) -> bool:
        return self.tokens == self.seqs

    def holds(self, num_tokens: int, num_seqs: int) -> bool:
        """Whether a step of this size pads to the bucket (see batch.padding): a decode bucket
        takes only all-decode steps; a prefill bucket needs a spare sequence to pad tokens."""
        if self.decode:
            return num_tokens == num_seqs <= self.seqs
        return num_tokens <= self.tokens and num_seqs <= self.seqs and (
            num_tokens == self.tokens or num_seqs < self.seqs)


def plan_buckets(decode_sizes: list[int], prefill_tokens: tuple[int, ...], max_batch_size: int,
                 max_num_tokens: int) -> list[Bucket]:
    decode = [Bucket(s, s) for s in decode_sizes]
    prefill = [Bucket(t, min(max_batch_size + 1, t // 2)) for t in sorted(set(prefill_tokens))
               if t <= max_num_tokens and t // 2 >= 2]
    return sorted(set(decode + prefill))


class StepGraphs:
    """Captured forwards for each bucket, and the static buffers they read."""

    def __init__(self, forward: Forward, block_size: int, device: torch.device, buckets: list[Bucket],
                 max_blocks_per_seq: int, scratch_block: int):
        if not buckets:
            raise ValueError("no CUDA graph buckets to capture")
        self.block_size = block_size
        self.device = device
        self.scratch_block = scratch_block
        self.max_rows = max(b.tokens for b in buckets)
        self.max_blocks_per_seq = max(max_blocks_per_seq, -(-self.max_rows // block_size))
        self._alloc_buffers(self.max_rows, max(b.seqs for b in buckets))
        self._graphs: dict[Bucket, torch.cuda.CUDAGraph] = {}
        self._logits: dict[Bucket, torch.Tensor] = {}
        self._capture(forward, sorted(buckets, reverse=True))

    def _alloc_buffers(self, rows: int, seqs: int) -> None:
        device = self.device
        self._dev_rows = torch.zeros(4, rows, dtype=torch.long, device=device)
        self._dev_seqs = torch.zeros(2 * seqs + 1, dtype=torch.int32, device=device)
        self._dev_tables = torch.zeros(seqs, self.max_blocks_per_seq, dtype=torch.int32, device=device)
        self._mirrors = [_PinnedMirror(rows, seqs, self.max_blocks_per_seq, device) for _ in range(2)]
        self._turn = 0

    @property
    def buckets(self) -> list[Bucket]:
        return sorted(self._graphs)

    @property
    def sizes(self) -> list[int]:
        """The decode batch sizes captured."""
        return [b.seqs for b in self.buckets if b.decode]

    def _view(self, bucket: Bucket) -> PackedBatch:
        t, b, seqs = bucket.tokens, bucket.seqs, (self._dev_seqs.shape[0] - 1) // 2
        rows = self._dev_rows
        return PackedBatch(rows[0:1, :t], rows[1:2, :t], self._dev_seqs[:b + 1], self._dev_seqs[seqs + 1:seqs + 1 + b],
                           self._dev_tables[:b], rows[2, :t], rows[3, :t])

    def _load(self, chunks: list[Chunk], bucket: Bucket) -> None:
        """Lay `chunks` out padded to `bucket` and copy them into the static buffers."""
        num_tokens = sum(len(c.token_ids) for c in chunks)
        pads = padding(bucket.tokens - num_tokens, bucket.seqs - len(chunks), self.scratch_block, self.block_size)
        layout = lay_out(chunks + pads, self.block_size)
        mirror = self._mirrors[self._turn]
        self._turn ^= 1
        mirror.send(layout, self._dev_rows, self._dev_seqs, self._dev_tables)

    @torch.inference_mode()
    def _capture(self, forward: Forward, buckets: list[Bucket]) -> None:
        """Largest bucket first, all in one memory pool, so smaller graphs reuse its memory.

        Each bucket runs twice on a side stream before capture (Triton compiles and autotunes
        there, cuBLAS picks its kernels), as CUDA graph capture requires."""
        pool = torch.cuda.graph_pool_handle()
        for bucket in buckets:
            self._load([], bucket)  # all padding: the capture writes only the scratch block
            view = self._view(bucket)
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(2):
                    forward(view)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._logits[bucket] = forward(view)
            self._graphs[bucket] = graph
        torch.cuda.synchronize(self.device)

    def bucket_for(self, chunks: list[Chunk]) -> Bucket | None:
        """The smallest bucket that runs this step, or None when it must run eagerly."""
        if max(len(c.block_ids) for c in chunks) > self.max_blocks_per_seq:
            return None
        num_tokens = sum(len(c.token_ids) for c in chunks)
        return next((b for b in self.buckets if b.holds(num_tokens, len(chunks))), None)

    def run(self, chunks: list[Chunk], bucket: Bucket) -> torch.Tensor:
        """Next-token logits [len(chunks), vocab]: a view of the graph's output, valid until the
        next replay."""
        self._load(chunks, bucket)
        self._graphs[bucket].replay()
        return self._logits[bucket][:len(chunks)]


class _PinnedMirror:
    """Pinned host copies of the static buffers, so that a step's inputs go over asynchronously.
    `send` waits until this mirror's previous copies have left before overwriting it."""

    def __init__(self, rows: int, seqs: int, width: int, device: torch.device):
        pin = device.type == "cuda"
        self.rows = torch.zeros(4, rows, dtype=torch.long, pin_memory=pin)
        self.seqs = torch.zeros(2 * seqs + 1, dtype=torch.int32, pin_memory=pin)
        self.tables = torch.zeros(seqs * width, dtype=torch.int32, pin_memory=pin)
        self._sent = torch.cuda.Event() if pin else None

    def send(self, layout: HostLayout, dev_rows: torch.Tensor, dev_seqs: torch.Tensor,
             dev_tables: torch.Tensor) -> None:
        if self._sent is not None:
            self._sent.synchronize()
        t, capacity = layout.num_tokens, (dev_seqs.shape[0] - 1) // 2
        b, width = layout.tables.shape
        self.rows.numpy()[:, :t] = layout.rows
        seqs = self.seqs.numpy()
        seqs[:b + 1] = layout.seqs[:b + 1]
        seqs[capacity + 1:capacity + 1 + b] = layout.seqs[b + 1:]
        self.tables.numpy()[:b * width] = layout.tables.reshape(-1)
        dev_rows.copy_(self.rows, non_blocking=True)  # a few KiB: whole buffers stay contiguous
        dev_seqs.copy_(self.seqs, non_blocking=True)
        dev_tables[:b, :width].copy_(self.tables[:b * width].view(b, width), non_blocking=True)
        if self._sent is not None:
            self._sent.record()
