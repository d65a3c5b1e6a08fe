"""Server-sent event streams (the dashboard's views, the recorder's records): a first event, then
whatever the stream's queue gets, until the empty chunk that ends it or the client leaves."""

from __future__ import annotations

import asyncio
import contextlib

from aiohttp import web

END = b""  # put on a queue: its stream ends (epp is stopping)


async def stream_events(request: web.Request, queue: asyncio.Queue[bytes], first: bytes) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"content-type": "text/event-stream", "cache-control": "no-cache"})
    with contextlib.suppress(ConnectionResetError, asyncio.CancelledError):
        await resp.prepare(request)
        await resp.write(first)
        while chunk := await queue.get():
            await resp.write(chunk)
    return resp


def end(queue: asyncio.Queue[bytes]) -> None:
    """End ``queue``'s stream, dropping its oldest chunk if it is full."""
    if queue.full():
        with contextlib.suppress(asyncio.QueueEmpty):
            queue.get_nowait()
    queue.put_nowait(END)
