"""How late the event loop runs: every pick, scrape and stream waits behind whatever holds it.

A callback is scheduled every ``interval``; how much later than asked it runs is the loop's lag
(``epp_event_loop_lag_seconds``). A lag of ``warn_after`` or more is logged, at most once per
``log_every`` seconds with how many such stalls came since the last line, so an operator (or a
benchmark) can tell a stall of the picker from one of the gateway or the machine.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry

from epp.observability.loopmetrics import LoopHistogram

log = logging.getLogger("epp.loop")
LAG_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)


class LoopLag:
    def __init__(self, registry: CollectorRegistry | None, interval: float = 0.05, warn_after: float = 0.05,
                 log_every: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval, self.warn_after, self.log_every, self.clock = interval, warn_after, log_every, clock
        self.lag = LoopHistogram("epp_event_loop_lag_seconds",
                                 "How much later than scheduled a callback on epp's event loop ran (sampled "
                                 "every 50 ms): the wait every pick, scrape and stream had then.",
                                 buckets=LAG_BUCKETS, registry=registry)
        self.stalls = 0  # lags of warn_after or more, since start
        self.worst = 0.0
        self._unlogged = 0
        self._logged_at = float("-inf")
        self._handle: asyncio.TimerHandle | None = None
        self._due = 0.0

    def start(self) -> None:
        self._due = self.clock() + self.interval
        self._handle = asyncio.get_running_loop().call_later(self.interval, self._tick)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _tick(self) -> None:
        now = self.clock()
        lag = max(0.0, now - self._due)
        self.lag.observe(lag)
        if lag >= self.warn_after:
            self.stalls += 1
            self._unlogged += 1
            self.worst = max(self.worst, lag)
            if now - self._logged_at >= self.log_every:
                log.warning("the event loop ran %.0f ms late (%d stalls of %.0f ms or more since the last such "
                            "line): picks waited that long", lag * 1e3, self._unlogged, self.warn_after * 1e3)
                self._logged_at, self._unlogged = now, 0
        self._due = now + self.interval
        self._handle = asyncio.get_running_loop().call_later(self.interval, self._tick)
