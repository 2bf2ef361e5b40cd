"""Owns the paged KV cache's blocks: who holds each one, and which full blocks hold a known prefix.

A block is held by reference: a sequence that computed it, plus every sequence that reuses it as
part of a cached prefix (read-only: a sequence only writes at positions past its cached prefix, so
a shared block, which is full, is never written). A block nobody holds is free. Free blocks that
carry a prefix hash keep their content: a later request with the same prefix takes them back. They
are given out for new content only when no plain free block is left, least recently used first,
so caching costs nothing when memory is needed: growth, preemption and exhaustion are as without it.
"""

from __future__ import annotations

from collections import OrderedDict


class BlockManager:
    """Block ids 0..num_blocks-1 with reference counts and a hash -> block map of cached full blocks.

    Sequences own plain lists of block ids (their block table); the manager grows them to cover a
    token count (all or nothing, so a failed growth leaves nothing half-allocated) and drops their
    references when a sequence finishes, is aborted or is preempted.
    """

    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._refs = [0] * num_blocks
        # Unreferenced blocks in the order they are given out: plain ones first, then cached ones
        # least recently freed first. Taking a cached block back removes it from here.
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._hash_of: dict[int, bytes] = {}
        self._block_of: dict[bytes, int] = {}
        self.num_evictions = 0  # cached blocks given out for new content

    @property
    def num_free(self) -> int:
        """Blocks that can be given out now (plain free blocks and unreferenced cached ones)."""
        return len(self._free)

    @property
    def num_cached(self) -> int:
        """Blocks that carry a prefix hash (referenced or not)."""
        return len(self._hash_of)

    def ref_count(self, block: int) -> int:
        return self._refs[block]

    def is_cached(self, block: int) -> bool:
        return block in self._hash_of

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def grow(self, block_ids: list[int], num_tokens: int) -> bool:
        """Extend `block_ids` in place to hold `num_tokens`; False (and no change) if blocks run out."""
        return self.allocate(block_ids, [], num_tokens)

    def allocate(self, block_ids: list[int], cached: list[int], num_tokens: int) -> bool:
        """Append the cached blocks `cached` (shared, see `lookup`) and fresh ones to `block_ids` to
        hold `num_tokens`; False (and no change) if blocks run out."""
        missing = self.blocks_for(num_tokens) - len(block_ids) - len(cached)
        if missing <= 0 and not cached:  # the common decode step: the last block still has room
            return True
        revived = sum(1 for b in cached if self._refs[b] == 0)  # leave the free queue when taken
        if missing > len(self._free) - revived:
            return False
        for b in cached:
            if self._refs[b] == 0:
                del self._free[b]
            self._refs[b] += 1
        block_ids.extend(cached)
        for _ in range(max(missing, 0)):
            block_ids.append(self._take_free())
        return True

    def _take_free(self) -> int:
        block, _ = self._free.popitem(last=False)
        digest = self._hash_of.pop(block, None)
        if digest is not None:  # evicted: its content is about to change
            del self._block_of[digest]
            self.num_evictions += 1
        self._refs[block] = 1
        return block

    def free(self, block_ids: list[int]) -> None:
        """Drop one reference to every block of `block_ids` and empty the list. The sequence's last
        blocks are queued first, so a prefix outlives its tails when cached blocks are evicted."""
        for block in reversed(block_ids):
            self._refs[block] -= 1
            if self._refs[block] == 0:
                self._free[block] = None
                if block not in self._hash_of:  # nothing worth keeping: give it out first
                    self._free.move_to_end(block, last=False)
        block_ids.clear()

    def lookup(self, digests: list[bytes]) -> list[int]:
        """The blocks holding the longest run of `digests` (a prefix's block hashes, in order)."""
        blocks = []
        for digest in digests:
            block = self._block_of.get(digest)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def register(self, block_ids: list[int], digests: list[bytes]) -> None:
        """Record that block_ids[i] holds the prefix hashed `digests[i]` (full, computed blocks).

        A block already cached keeps its hash; a hash already held by another block (two requests
        computed the same prefix at once) leaves this copy plain, freed first when its holder ends."""
        for block, digest in zip(block_ids, digests):
            if block not in self._hash_of and digest not in self._block_of:
                self._hash_of[block] = digest
                self._block_of[digest] = block

    def reset_prefix_cache(self) -> int:
        """Forget the hashes of cached blocks nobody holds (their content becomes garbage); how many."""
        dropped = [b for b in self._free if b in self._hash_of]
        for block in dropped:
            del self._block_of[self._hash_of.pop(block)]
            self._free.move_to_end(block, last=False)
        return len(dropped)
