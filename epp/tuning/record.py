"""``epp record``: write a trace of a running epp's requests, one JSON line per finished request.

It reads epp's ``/record`` stream (the metrics port) until ``seconds`` or ``requests`` is reached,
and writes each record with ``t`` made relative to the first one (seconds). The trace holds
prompt block hashes and token counts, not prompt text, unless ``--prompts`` is given and that
epp runs with ``--record-prompts``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import orjson


class RecordError(Exception):
    """The recording could not start (the message says why)."""


@dataclass(slots=True)
class RecordSummary:
    records: int
    seconds: float
    path: Path


async def record_trace(url: str, out: Path, *, seconds: float = 60.0, requests: int = 0, prompts: bool = False,
                       token: str | None = None, ready: asyncio.Event | None = None) -> RecordSummary:
    """Record from ``url`` (epp's metrics address, e.g. http://10.0.0.5:9090) into ``out``.
    ``ready`` is set once epp has opened the recording."""
    headers = {"authorization": f"Bearer {token}"} if token else {}
    target = url.rstrip("/") + "/record" + ("?prompts=1" if prompts else "")
    started = time.monotonic()
    n = 0
    first: float | None = None
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
    async with aiohttp.ClientSession(timeout=timeout) as s:
        try:
            resp = await s.get(target, headers=headers)
        except aiohttp.ClientError as e:
            raise RecordError(f"cannot reach {target}: {e}") from None
        async with resp:
            if resp.status != 200:
                try:
                    message = (await resp.json())["error"]["message"]
                except (aiohttp.ContentTypeError, KeyError, TypeError, ValueError):
                    message = (await resp.text())[:200]
                raise RecordError(f"{target}: {resp.status} {message}")
            with out.open("wb") as f:
                deadline = started + seconds

                async def lines() -> None:
                    nonlocal n, first
                    async for raw in resp.content:
                        if raw.startswith(b": recording") and ready is not None:
                            ready.set()
                        if not raw.startswith(b"data: "):
                            continue
                        record = orjson.loads(raw[len(b"data: "):])
                        if "pool" in record:  # the header: the pool's endpoints and cache configs
                            f.write(orjson.dumps(record) + b"\n")
                            continue
                        if first is None:
                            first = record["t"]
                        record["t"] = round(record["t"] - first, 4)
                        f.write(orjson.dumps(record) + b"\n")
                        n += 1
                        if requests and n >= requests:
                            return

                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(lines(), max(0.0, deadline - time.monotonic()))
    return RecordSummary(n, round(time.monotonic() - started, 2), out)
