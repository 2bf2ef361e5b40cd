"""Running a request's engine requests (its prompts x choices) from the event loop: merged into one
stream of (index, output), or collected to their final outputs while watching for a client that
disconnects (then every one of them is aborted)."""

from __future__ import annotations

import asyncio
from contextlib import aclosing
from typing import AsyncIterator

from fastapi import Request

from ..runtime.outputs import RequestOutput
from .metrics import RequestTimer, ServerMetrics
from .protocol import ApiError

DISCONNECT_POLL_S = 0.25


async def merged(streams: list[AsyncIterator[RequestOutput]],
                 metrics: ServerMetrics) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Outputs of several engine requests as they come, tagged with their index. Closing this
    cancels the pumps (or closes the one stream), which aborts every request still running."""
    if len(streams) == 1:  # the usual request: no pump task and queue hop per token
        timer = RequestTimer(metrics)
        async with aclosing(streams[0]) as outs:
            async for out in outs:
                timer.output(len(out.delta_token_ids))
                yield 0, out
        timer.done()
        return
    queue: asyncio.Queue[tuple[int, RequestOutput | None]] = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[RequestOutput]) -> None:
        timer = RequestTimer(metrics)
        try:
            async with aclosing(stream) as outs:
                async for out in outs:
                    timer.output(len(out.delta_token_ids))
                    queue.put_nowait((index, out))
            timer.done()
        finally:
            queue.put_nowait((index, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            index, out = await queue.get()
            if out is None:
                remaining -= 1
            else:
                yield index, out
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def collect(request: Request, streams: list[AsyncIterator[RequestOutput]],
                  metrics: ServerMetrics) -> list[RequestOutput]:
    """The final output of each stream; a client that disconnects meanwhile aborts them all."""
    finals: list[RequestOutput | None] = [None] * len(streams)

    async def drain() -> None:
        async with aclosing(merged(streams, metrics)) as outs:
            async for index, out in outs:
                if out.finished:
                    finals[index] = out

    task = asyncio.create_task(drain())
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if not task.done() and await request.is_disconnected():
                raise ApiError(499, "the client closed the request")
        task.result()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    return finals
