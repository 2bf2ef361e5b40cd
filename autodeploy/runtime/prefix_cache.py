"""Prefix caching: which full KV blocks of a sequence are the same as blocks computed before.

A full block is named by a hash chained over its tokens and its predecessor's hash, seeded with
whatever else changes a block's content (the cache dtype; a LoRA later), so equal hashes mean equal
K/V. The scheduler asks `match` when it admits a sequence (the longest cached run of its blocks;
the last token is always left to compute, its logits are needed) and `register`s a sequence's
computed blocks before each step and when it leaves, so that they outlive it (block_manager.py
keeps them until memory is needed).

Only tokens the host knows can be hashed: under the overlapped engine a sequence's newest token may
still be PENDING on the device, and the block holding it waits for the next step.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from .block_manager import BlockManager
from .sequence import PENDING, Sequence


def chain_hash(parent: bytes, tokens: list[int]) -> bytes:
    """The hash of a block holding `tokens` after the block hashed `parent` (128-bit BLAKE2b)."""
    return hashlib.blake2b(parent + np.asarray(tokens, dtype=np.int64).tobytes(), digest_size=16).digest()


@dataclass
class PrefixCacheStats:
    queried_tokens: int = 0  # prompt tokens of admitted requests that were looked up
    hit_tokens: int = 0  # of those, tokens whose K/V came from the cache

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0


class PrefixCache:
    def __init__(self, blocks: BlockManager, salt: str = ""):
        self.blocks = blocks
        self.block_size = blocks.block_size
        self._root = hashlib.blake2b(salt.encode(), digest_size=16).digest()
        self.stats = PrefixCacheStats()

    def _hashes(self, seq: Sequence) -> list[bytes]:
        """The hashes of `seq`'s full blocks of known tokens (extending the ones kept on `seq`)."""
        known = seq.num_tokens - (seq.output_ids[-1:] == [PENDING])
        hashes, size = seq.block_hashes, self.block_size
        for i in range(len(hashes), known // size):
            hashes.append(chain_hash(hashes[-1] if hashes else self._root, seq.token_ids(i * size, (i + 1) * size)))
        return hashes

    def match(self, seq: Sequence) -> list[int]:
        """Cached blocks holding the longest prefix of `seq` that leaves at least its last token to compute."""
        usable = (seq.num_tokens - 1) // self.block_size
        return self.blocks.lookup(self._hashes(seq)[:usable])

    def count(self, seq: Sequence, num_cached_tokens: int) -> None:
        """Account an admitted request's first lookup (a preempted one's recompute is not a new query)."""
        if seq.num_cached_tokens is None:
            seq.num_cached_tokens = num_cached_tokens
            self.stats.queried_tokens += len(seq.prompt_ids)
            self.stats.hit_tokens += num_cached_tokens

    def register(self, seq: Sequence) -> None:
        """Offer `seq`'s computed full blocks to the cache."""
        full = min(seq.num_computed // self.block_size, len(seq.block_ids))
        if full > seq.num_registered:
            hashes = self._hashes(seq)[:full]
            self.blocks.register(seq.block_ids[seq.num_registered:len(hashes)], hashes[seq.num_registered:])
            seq.num_registered = len(hashes)
