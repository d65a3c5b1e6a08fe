"""An asyncio event loop on a virtual clock: when nothing is ready, time jumps to the next timer.

Everything the loop runs sees ``loop.time()`` advance only through sleeps and timers, never
through the host's speed, so a replay of a minute of traffic against simulated engines takes as
long as its Python work, and gives the same answer on a busy machine as on an idle one. Sockets
and other file descriptors still work (they are polled without waiting first); a loop with
nothing scheduled at all waits for them as a normal loop does.
"""

from __future__ import annotations

import asyncio
import selectors
from typing import Any


class _JumpingSelector(selectors.DefaultSelector):
    """Returns ready descriptors at once; with none ready, advances ``clock`` by the timeout."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        ready = super().select(0)
        if ready or (timeout is not None and timeout <= 0):
            return ready
        if timeout is None:  # nothing scheduled: only a descriptor can wake the loop
            return super().select(None)
        self.now += timeout
        return []


class VirtualClockLoop(asyncio.SelectorEventLoop):
    """An event loop whose ``time()`` is virtual seconds from 0 (see the module doc)."""

    def __init__(self) -> None:
        self._jumping = _JumpingSelector()
        super().__init__(self._jumping)

    def time(self) -> float:
        return self._jumping.now

    def run(self, main: Any) -> Any:
        """Run the coroutine ``main`` to completion on this loop and close the loop."""
        with asyncio.Runner(loop_factory=lambda: self) as runner:
            return runner.run(main)
