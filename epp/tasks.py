"""Stopping background tasks: cancel them all, then wait for each to end."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable
from typing import Any


async def cancel_and_wait(tasks: Iterable[asyncio.Task[Any] | None]) -> None:
    """Cancel every task (None entries are skipped), then wait until each has ended."""
    todo = [t for t in tasks if t is not None]
    for t in todo:
        t.cancel()
    for t in todo:
        with contextlib.suppress(asyncio.CancelledError):
            await t
