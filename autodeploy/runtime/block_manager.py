"""Owns the paged KV cache's blocks: which are free, which belong to whom."""

from __future__ import annotations

from collections import deque


class BlockManager:
    """A free list over block ids 0..num_blocks-1.

    Sequences own plain lists of block ids (their block table); the manager grows them to cover a
    token count (all or nothing, so a failed growth leaves nothing half-allocated) and takes them
    back when a sequence finishes, is aborted or is preempted.
    """

    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def grow(self, block_ids: list[int], num_tokens: int) -> bool:
        """Extend `block_ids` in place to hold `num_tokens`; False (and no change) if blocks run out."""
        missing = -(-num_tokens // self.block_size) - len(block_ids)
        if missing <= 0:  # the common decode step: the last block still has room
            return True
        if missing > len(self._free):
            return False
        block_ids.extend(self._free.popleft() for _ in range(missing))
        return True

    def free(self, block_ids: list[int]) -> None:
        """Return every block of `block_ids` to the pool and empty the list."""
        self._free.extend(block_ids)
        block_ids.clear()
