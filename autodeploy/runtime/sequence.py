"""One request's state as it moves through waiting -> running -> finished (and back on preemption)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

import torch

from .sampling_params import SamplingParams


PENDING = -1  # an output token sampled on the device that the host has not read yet


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)  # identity semantics: queues look sequences up by object
class Sequence:
    """Tokens so far, the cache blocks holding them, and how far the cache is filled.

    `num_computed` counts the leading tokens whose K/V sit in the cache. Everything after it is
    what the next step(s) must run: a whole prompt (in chunks when long), or the one token sampled
    last step. Preemption frees the blocks and resets `num_computed` to 0, keeping the generated
    tokens, so readmission recomputes prompt + output and continues where it stopped (or takes
    them back from the prefix cache when they are still there).
    """

    request_id: str
    prompt: str | None
    prompt_ids: list[int]
    params: SamplingParams
    arrival: int
    generator: torch.Generator | None = None
    output_ids: list[int] = field(default_factory=list)
    block_ids: list[int] = field(default_factory=list)
    num_computed: int = 0
    status: Status = Status.WAITING
    finish_reason: str | None = None  # stop | length | abort | error
    # Asynchronous steps: the last output token may still be on the device (PENDING on the host).
    feed_row: int = -1  # row of that token among the last step's samples
    final: bool = False  # that token is the last one the length limits allow: schedule no more
    error: str | None = None
    # Prefix caching (prefix_cache.py): hashes of the full blocks of known tokens, how many of
    # `block_ids` carry theirs, and how many prompt tokens the first admission found cached.
    block_hashes: list[bytes] = field(default_factory=list)
    num_registered: int = 0
    num_cached_tokens: int | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_pending(self) -> int:
        """Tokens not yet in the cache: the work the scheduler must place."""
        return self.num_tokens - self.num_computed

    def token_ids(self, start: int, end: int) -> list[int]:
        n = len(self.prompt_ids)
        return (self.prompt_ids[start:end] if start < n else []) + self.output_ids[max(start - n, 0):max(end - n, 0)]
