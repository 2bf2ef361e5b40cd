"""Packing scheduled chunks into the cached graph's flat inputs (see kv_cache.py for the layout)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Chunk:
    """Tokens [start, start + len(token_ids)) of one sequence, whose cache lives in `block_ids`."""

    token_ids: list[int]
    start: int
    block_ids: list[int]
    positions: list[int] | None = None  # model positions; default: the context positions


@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # [1, T]
    position_ids: torch.Tensor  # [1, T]
    cu_seqlens: torch.Tensor  # int32 [B + 1]
    seq_lens: torch.Tensor  # int32 [B]
    block_tables: torch.Tensor  # int32 [B, max_blocks]
    slot_mapping: torch.Tensor  # int64 [T]

    def graph_args(self) -> tuple[torch.Tensor, ...]:
        return (self.input_ids, self.position_ids, self.cu_seqlens, self.seq_lens, self.block_tables, self.slot_mapping)

    @property
    def last_token_rows(self) -> torch.Tensor:
        """Row in T of each sequence's last token this step (where its next-token logits are)."""
        return self.cu_seqlens[1:].long() - 1


def pack(chunks: list[Chunk], block_size: int, device: torch.device) -> PackedBatch:
    ids, positions, slots, cu, lens = [], [], [], [0], []
    for c in chunks:
        end = c.start + len(c.token_ids)
        ids += c.token_ids
        positions += c.positions if c.positions is not None else range(c.start, end)
        slots += [c.block_ids[p // block_size] * block_size + p % block_size for p in range(c.start, end)]
        cu.append(len(ids))
        lens.append(end)
    width = max(len(c.block_ids) for c in chunks)
    tables = [c.block_ids + [0] * (width - len(c.block_ids)) for c in chunks]

    def tensor(values, dtype):
        return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)

    return PackedBatch(
        input_ids=tensor([ids], torch.long),
        position_ids=tensor([positions], torch.long),
        cu_seqlens=tensor(cu, torch.int32),
        seq_lens=tensor(lens, torch.int32),
        block_tables=tensor(tables, torch.int32),
        slot_mapping=tensor(slots, torch.long),
    )
