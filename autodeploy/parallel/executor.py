"""The executor seam over N ranks: rank 0 announces each step, every rank runs its shard of it.

Rank 0's `TensorParallelExecutor` sends the step's chunks (channel.py) and then runs the step as
the single-rank executor does; each worker's `serve_steps` receives the same chunks and makes the
same call on its own executor, so the same bucket is chosen and the same CUDA graph replayed on
every rank, and the graphs' all_reduces meet. The previous step's sampled tokens (only rank 0
samples) are broadcast from rank 0 before a step that feeds them.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.fx import GraphModule

from autodeploy.errors import WorkerError
from autodeploy.runtime.batch import Chunk
from autodeploy.runtime.executor import ModelExecutor

from .channel import Command, StepChannel


def share_sampled(executor: ModelExecutor, chunks: list[Chunk]) -> None:
    """Rank 0's last sampled tokens to every rank, when this step feeds any of them."""
    if any(c.feed_row >= 0 for c in chunks):
        dist.broadcast(executor._sampled, 0)


def rows_as_chunks(input_ids: torch.Tensor, position_ids: torch.Tensor) -> list[Chunk]:
    return [Chunk(ids, 0, [], pos) for ids, pos in zip(input_ids.tolist(), position_ids.tolist())]


class TensorParallelExecutor(ModelExecutor):
    """Rank 0's executor: each step goes to the workers first; a failed collective names the worker."""

    def __init__(self, gm: GraphModule, max_batch_size: int, channel: StepChannel):
        super().__init__(gm, max_batch_size)
        self.channel = channel

    def last_token_logits(self, chunks: list[Chunk]) -> torch.Tensor:
        self.channel.send(Command.STEP, chunks)
        try:
            share_sampled(self, chunks)
            return super().last_token_logits(chunks)
        except RuntimeError as e:
            raise self._failed(e) from None

    def full_logits(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        self.channel.send(Command.FULL, rows_as_chunks(input_ids, position_ids))
        try:
            return super().full_logits(input_ids, position_ids)
        except RuntimeError as e:
            raise self._failed(e) from None

    def _failed(self, error: RuntimeError) -> Exception:
        """gloo/NCCL errors when a peer has gone become one clear WorkerError."""
        if isinstance(error, WorkerError):
            return error
        return WorkerError(self.channel.why_failed(error))


def serve_steps(executor: ModelExecutor, channel: StepChannel) -> None:
    """A worker's loop: run every step rank 0 announces, until it says stop."""
    while True:
        command, chunks = channel.receive()
        if command is Command.STOP:
            return
        if command is Command.STEP:
            share_sampled(executor, chunks)
            executor.last_token_logits(chunks)
        else:
            input_ids = torch.tensor([c.token_ids for c in chunks])
            executor.full_logits(input_ids, torch.tensor([c.positions for c in chunks]))
