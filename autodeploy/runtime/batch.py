"""Packing scheduled chunks into the cached graph's flat inputs (see kv_cache.py for the layout).

One host-side layout serves the eager forward and the CUDA graphs alike. A graph has fixed shapes
(tokens T, sequences B), so a step that needs fewer is padded: with one-token sequences when the
missing tokens and sequences are equal (keeps a decode step's T == B), else with one sequence
holding every missing token plus empty sequences. Padding lives in a scratch block that no real
sequence owns, so it cannot touch real K/V, and its logits are dropped.

A token sampled by the previous step may still be on the device when the next step is packed
(the engine overlaps host and device work): its chunk carries `feed_row`, the row of the previous
step's sampled tokens to take it from, and the graph reads it there (`feed` in the layout).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Chunk:
    """Tokens [start, start + len(token_ids)) of one sequence, whose cache lives in `block_ids`."""

    token_ids: list[int]
    start: int
    block_ids: list[int]
    positions: list[int] | None = None  # model positions; default: the context positions
    feed_row: int = -1  # >= 0: the last token is row `feed_row` of the previous step's samples


@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # [1, T]
    position_ids: torch.Tensor  # [1, T]
    cu_seqlens: torch.Tensor  # int32 [B + 1]
    seq_lens: torch.Tensor  # int32 [B]
    block_tables: torch.Tensor  # int32 [B, max_blocks]
    slot_mapping: torch.Tensor  # int64 [T]
    feed: torch.Tensor | None = None  # int64 [T]: row of the previous step's samples, or -1

    def graph_args(self) -> tuple[torch.Tensor, ...]:
        return (self.input_ids, self.position_ids, self.cu_seqlens, self.seq_lens, self.block_tables, self.slot_mapping)

    @property
    def last_token_rows(self) -> torch.Tensor:
        """Row in T of each sequence's last token this step (where its next-token logits are)."""
        return self.cu_seqlens[1:].long() - 1


@dataclass
class HostLayout:
    """A packed batch as host arrays: rows [ids, positions, slots, feed] int64 [4, T],
    [cu_seqlens | seq_lens] int32 [2B + 1], block tables int32 [B, width]."""

    rows: np.ndarray
    seqs: np.ndarray
    tables: np.ndarray

    @property
    def num_tokens(self) -> int:
        return self.rows.shape[1]

    @property
    def has_feed(self) -> bool:
        return bool((self.rows[3] >= 0).any())

    def to_device(self, device: torch.device) -> PackedBatch:
        rows = torch.from_numpy(self.rows).to(device, non_blocking=True)
        seqs = torch.from_numpy(self.seqs).to(device, non_blocking=True)
        b = (len(self.seqs) - 1) // 2
        return PackedBatch(rows[0:1], rows[1:2], seqs[:b + 1], seqs[b + 1:],
                           torch.from_numpy(self.tables).to(device, non_blocking=True), rows[2],
                           rows[3] if self.has_feed else None)


def padding(num_tokens: int, num_seqs: int, scratch_block: int, block_size: int) -> list[Chunk]:
    """Chunks that fill a step up by `num_tokens` tokens and `num_seqs` sequences (see above)."""
    if num_tokens == num_seqs:
        return [Chunk([0], 0, [scratch_block])] * num_tokens
    if num_seqs < 1:
        raise ValueError(f"cannot pad {num_tokens} tokens without a spare sequence")
    long_pad = Chunk([0] * num_tokens, 0, [scratch_block] * max(-(-num_tokens // block_size), 1))
    return [long_pad] + [Chunk([], 0, [scratch_block])] * (num_seqs - 1)


def lay_out(chunks: list[Chunk], block_size: int) -> HostLayout:
    ids, positions, slots, feed, cu, lens = [], [], [], [], [0], []
    for c in chunks:
        end = c.start + len(c.token_ids)
        ids += c.token_ids
        feed += [-1] * len(c.token_ids)
        if c.feed_row >= 0:
            ids[-1], feed[-1] = 0, c.feed_row
        positions += c.positions if c.positions is not None else range(c.start, end)
        table = c.block_ids
        slots += [table[p // block_size] * block_size + p % block_size for p in range(c.start, end)]
        cu.append(len(ids))
        lens.append(end)
    width = max(len(c.block_ids) for c in chunks)
    tables = np.zeros((len(chunks), width), dtype=np.int32)
    for row, c in zip(tables, chunks):
        row[:len(c.block_ids)] = c.block_ids
    return HostLayout(np.array([ids, positions, slots, feed], dtype=np.int64).reshape(4, len(ids)),
                      np.array(cu + lens, dtype=np.int32), tables)


def pack(chunks: list[Chunk], block_size: int, device: torch.device) -> PackedBatch:
    return lay_out(chunks, block_size).to_device(device)
