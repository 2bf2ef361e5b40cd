"""Rank 0 -> workers: each step's scheduled chunks, as tensors broadcast over torch.distributed.

Rank 0 keeps the scheduler; the workers only need what the step runs: per chunk its tokens, start,
cache blocks, positions and feed row. They travel as two int64 CPU tensors (a fixed header, then
the payload) broadcast on a gloo group of their own. Its timeout is long, because workers wait on
it while rank 0 is idle; rank 0 never blocks on it longer than `deadline_s`, checking meanwhile
that every worker process is alive, so a dead worker is a clear error, not a hang.
"""

from __future__ import annotations

import time
from datetime import timedelta
from enum import IntEnum
from typing import Callable

import torch
import torch.distributed as dist

from autodeploy.errors import WorkerError
from autodeploy.runtime.batch import Chunk

_HEADER = 3  # command, number of chunks, payload length
_PER_CHUNK = 5  # tokens, start, blocks, feed row, has positions


class Command(IntEnum):
    STEP = 1  # executor.last_token_logits(chunks)
    FULL = 2  # executor.full_logits of one chunk per row (agreement checks)
    STOP = 3


def encode(chunks: list[Chunk]) -> torch.Tensor:
    head, body = [], []
    for c in chunks:
        head += [len(c.token_ids), c.start, len(c.block_ids), c.feed_row, c.positions is not None]
        body += c.token_ids + c.block_ids + (c.positions or [])
    return torch.tensor(head + body, dtype=torch.int64)


def decode(payload: torch.Tensor, n: int) -> list[Chunk]:
    values = payload.tolist()
    chunks, at = [], n * _PER_CHUNK
    for i in range(n):
        tokens, start, blocks, feed_row, has_positions = values[i * _PER_CHUNK:(i + 1) * _PER_CHUNK]
        ids, at = values[at:at + tokens], at + tokens
        block_ids, at = values[at:at + blocks], at + blocks
        positions = None
        if has_positions:
            positions, at = values[at:at + tokens], at + tokens
        chunks.append(Chunk(ids, start, block_ids, positions, feed_row))
    return chunks


class StepChannel:
    """Both ends of the step broadcast; `group` is a gloo group holding every rank."""

    def __init__(self, group, alive: Callable[[], str | None] = lambda: None, deadline_s: float = 60.0):
        self.group = group
        self.alive = alive  # rank 0: returns why a worker is gone, or None
        self.deadline_s = deadline_s

    def send(self, command: Command, chunks: list[Chunk] = ()) -> None:
        payload = encode(list(chunks))
        self._broadcast(torch.tensor([command, len(chunks), payload.numel()], dtype=torch.int64))
        if payload.numel():
            self._broadcast(payload)

    def receive(self) -> tuple[Command, list[Chunk]]:
        header = torch.empty(_HEADER, dtype=torch.int64)
        dist.broadcast(header, 0, group=self.group)
        command, n, length = header.tolist()
        payload = torch.empty(length, dtype=torch.int64)
        if length:
            dist.broadcast(payload, 0, group=self.group)
        return Command(command), decode(payload, n)

    def _broadcast(self, tensor: torch.Tensor) -> None:
        """Rank 0's side: wait for the broadcast while watching the workers, at most `deadline_s`."""
        deadline = time.monotonic() + self.deadline_s
        try:
            work = dist.broadcast(tensor, 0, group=self.group, async_op=True)
            while not work.is_completed():
                gone = self.alive()
                if gone is not None:
                    raise WorkerError(gone)
                if time.monotonic() > deadline:
                    raise WorkerError(f"tensor-parallel workers did not take a step within {self.deadline_s:.0f} s")
                time.sleep(0.001)
            work.wait(timeout=timedelta(seconds=1))
        except RuntimeError as e:  # gloo: a peer closed its connection
            if isinstance(e, WorkerError):
                raise
            raise WorkerError(self.why_failed(e)) from None

    def why_failed(self, error: Exception) -> str:
        """The dead worker behind a failed collective (it may take a moment to be reaped), else the error."""
        for _ in range(100):
            gone = self.alive()
            if gone is not None:
                return gone
            time.sleep(0.02)
        return f"a tensor-parallel collective failed: {str(error).splitlines()[0]}"
