"""In-flight batching: which sequences run how many tokens this step.

Every step packs, under a token budget (`max_num_tokens`) and a cap on sequences holding cache
(`max_batch_size`):
  1. running sequences, oldest first: one token for a decode, the next chunk for a long prompt;
  2. then waiting requests, first come first served, each with as much of its prompt as fits
     (chunked prefill), as long as blocks remain. With a prefix cache, a request starts after the
     longest cached run of its full blocks (prefix_cache.py) and computes only the rest.
A step that also holds decodes takes at most `max_prefill_tokens_with_decodes` tokens in all
(decode-aware chunking): every decode in the step waits for the whole forward, so a long prefill
chunk would stretch the inter-token latency of every running request; prompts then take more,
smaller steps, and a step without decodes still takes the whole budget. The decodes count against
the bound, so a step fits the CUDA-graph bucket of that many tokens instead of spilling into the
next one up (twice the work); prompts keep at least a quarter of the bound when decodes fill it.
When a running sequence needs a block and none is free, the newest running sequence that is not
yet placed in this step is preempted (its blocks freed, to be recomputed later) - possibly the
sequence itself. Older requests therefore always make progress, and nothing is dropped.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .block_manager import BlockManager
from .prefix_cache import PrefixCache
from .sequence import Sequence, Status


@dataclass
class ScheduledChunk:
    seq: Sequence
    num_tokens: int  # run tokens [seq.num_computed, seq.num_computed + num_tokens)

    @property
    def completes(self) -> bool:
        """Whether this chunk reaches the sequence's last token, so the step samples a new one."""
        return self.seq.num_computed + self.num_tokens == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)


class Scheduler:
    def __init__(self, blocks: BlockManager, max_batch_size: int, max_num_tokens: int,
                 prefix_cache: PrefixCache | None = None, max_prefill_tokens_with_decodes: int = 0):
        if max_batch_size < 1 or max_num_tokens < 1:
            raise ValueError("max_batch_size and max_num_tokens must be >= 1")
        if max_prefill_tokens_with_decodes < 0:
            raise ValueError("max_prefill_tokens_with_decodes must be >= 0 (0 = no bound)")
        self.blocks = blocks
        self.max_batch_size = max_batch_size
        self.max_num_tokens = max_num_tokens
        self.prefix_cache = prefix_cache
        self.max_prefill_tokens_with_decodes = max_prefill_tokens_with_decodes or max_num_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order, hence arrival order

    def add(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
        self.waiting.append(seq)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        if self.prefix_cache is not None:  # what the last step computed can serve others from now on
            for seq in self.running:
                self.prefix_cache.register(seq)
        budget = self.max_num_tokens
        decodes = sum(s.num_pending == 1 and not s.final for s in self.running)
        prefill_budget = budget if not decodes else max(self.max_prefill_tokens_with_decodes - decodes,
                                                         self.max_prefill_tokens_with_decodes // 4, 1)
        placed: set[Sequence] = set()
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not Status.RUNNING or seq.final:  # preempted in this loop, or out of length
                continue
            n = min(seq.num_pending, budget if seq.num_pending == 1 else min(budget, prefill_budget))
            if n == 0 or not self._make_room(seq, seq.num_computed + n, placed, out):
                continue
            out.chunks.append(ScheduledChunk(seq, n))
            placed.add(seq)
            budget -= n
            prefill_budget -= n if seq.num_pending > 1 else 0
        if not out.preempted:  # admitting while evicting would only thrash
            self._admit(min(budget, prefill_budget), out)
        return out

    def _make_room(self, seq: Sequence, num_tokens: int, placed: set[Sequence], out: SchedulerOutput) -> bool:
        """Grow `seq` to `num_tokens`, preempting the newest unplaced running sequences as needed."""
        while not self.blocks.grow(seq.block_ids, num_tokens):
            victim = next(s for s in reversed(self.running) if s not in placed and not s.final)
            self._preempt(victim)
            out.preempted.append(victim)
            if victim is seq:
                return False
        return True

    def _admit(self, budget: int, out: SchedulerOutput) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.max_batch_size:
            seq = self.waiting[0]
            cached = self.prefix_cache.match(seq) if self.prefix_cache is not None else []
            num_cached = len(cached) * self.blocks.block_size
            n = min(seq.num_tokens - num_cached, budget)
            if not self.blocks.allocate(seq.block_ids, cached, num_cached + n):
                break
            seq.num_computed = num_cached
            seq.num_registered = len(cached)
            if self.prefix_cache is not None:
                self.prefix_cache.count(seq, num_cached)
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            out.chunks.append(ScheduledChunk(seq, n))
            budget -= n

    def _preempt(self, seq: Sequence) -> None:
        """Recompute-style preemption: drop the cache, keep the tokens, go back to the queue's head."""
        self.running.remove(seq)
        self._release(seq)
        seq.num_computed = 0
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence) -> None:
        """Take `seq` out of the queues (finished or aborted) and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._release(seq)
        seq.status = Status.FINISHED

    def _release(self, seq: Sequence) -> None:
        """Drop `seq`'s blocks, its computed full blocks staying behind in the prefix cache."""
        if self.prefix_cache is not None:
            self.prefix_cache.register(seq)
        self.blocks.free(seq.block_ids)
        seq.num_registered = 0
