"""Scrapes every endpoint's /metrics on an interval over a kept-alive connection per endpoint.

Each endpoint has its own loop (interval with +-10 % jitter, per-scrape timeout). A failed or
unparseable scrape marks the endpoint's signals as errored; the scheduler then avoids it while any
fresh endpoint exists. Loops start and stop as endpoints join and leave the datastore.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass

from epp.datastore.endpoint import EngineSignals
from epp.datastore.store import Datastore
from epp.signals.httpget import MAX_BODY, KeepAliveGetter
from epp.signals.mappings import EngineMapping, MetricNames
from epp.signals.promtext import MAX_SERIES, parse_signals
from epp.tasks import cancel_and_wait

log = logging.getLogger("epp.scraper")

ErrorHook = Callable[[str, str], None]  # (endpoint, the error's kind)


class BadStatus(Exception):
    """The pod answered /metrics with a status other than 200 (a poll error, not a parse error)."""
INLINE_PARSE_BYTES = 256 * 1024


@dataclass(frozen=True, slots=True)
class ScrapeTarget:
    """Where an endpoint's metrics are: scheme, path, a port other than the endpoint's, TLS."""

    path: str = "/metrics"
    port: int | None = None
    tls: ssl.SSLContext | None = None  # HTTPS when given


class Scraper:
    def __init__(self, store: Datastore, engines: EngineMapping, interval: float = 0.05, timeout: float = 1.0,
                 target: ScrapeTarget | None = None, on_error: ErrorHook | None = None,
                 on_scrape: Callable[[float], None] | None = None, max_bytes: int = MAX_BODY,
                 max_series: int = MAX_SERIES) -> None:
        self.max_bytes = max_bytes
        self.max_series = max_series
        self.store = store
        self.engines = engines
        self.target = target or ScrapeTarget()
        self.interval = interval
        self.timeout = timeout
        self.on_error = on_error
        self.on_scrape = on_scrape
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._getters: dict[str, KeepAliveGetter] = {}
        self._started = False
        self._rng = random.Random()

    def reconfigure(self, engines: EngineMapping, target: ScrapeTarget, interval: float) -> None:
        """New metric names, target or interval (a config reload): from the next scrape on."""
        if target != self.target:
            for g in self._getters.values():
                g.close()
            self._getters.clear()  # reconnect, perhaps to another port or with TLS
        self.engines, self.target, self.interval = engines, target, interval

    async def start(self) -> None:
        self._started = True
        self.store.on_change(self._endpoints_changed)
        self._endpoints_changed(set(self.store.addresses()), set())

    def _endpoints_changed(self, added: set[str], removed: set[str]) -> None:
        for a in removed:
            t = self._tasks.pop(a, None)
            if t is not None:
                t.cancel()
            g = self._getters.pop(a, None)
            if g is not None:
                g.close()
        for a in added:
            if a not in self._tasks and self._started:
                self._tasks[a] = asyncio.get_running_loop().create_task(self._loop(a), name=f"scrape {a}")

    async def stop(self) -> None:
        self._started = False
        await cancel_and_wait(list(self._tasks.values()))
        self._tasks.clear()
        for g in self._getters.values():
            g.close()
        self._getters.clear()
        self._started = False

    async def scrape_once(self, address: str) -> None:
        getter = self._getters.get(address)
        if getter is None:
            t = self.target
            getter = self._getters[address] = KeepAliveGetter(address, t.path, self.max_bytes, t.port, t.tls)
        picks_at_start = self.store.total_picks.get(address, 0)
        try:
            status, body = await getter.get(self.timeout)
            if status != 200:
                raise BadStatus(f"HTTP {status}")
            t0 = time.perf_counter()
            state = self.store.get(address)
            names = self.engines.for_labels(state.labels if state is not None else {})
            if len(body) <= INLINE_PARSE_BYTES:  # the common case (vLLM: ~55 KB, ~0.1 ms)
                signals = self._parse(body, names)
            else:  # a large exposition is read in a thread: routing gets the loop between its steps
                signals = await asyncio.to_thread(self._parse, body, names)
            if self.on_scrape is not None:
                self.on_scrape(time.perf_counter() - t0)
        except Exception as e:  # whatever a pod sends, the pod fails this scrape and nothing else
            kind = type(e).__name__
            reason = f"{kind}: {str(e)[:200]}" if str(e) else kind
            state = self.store.get(address)
            if state is not None and (state.error or "").partition(":")[0] != kind:
                log.warning("scrape of %s failed: %s", address, reason)  # once per change of kind
            self.store.record_scrape_error(address, reason)
            if self.on_error is not None:
                self.on_error(address, kind)
            return
        state = self.store.get(address)
        if state is not None and state.error is not None:
            log.info("scrape of %s recovered", address)
        self.store.record_scrape(address, signals, picks_at_start)

    def _parse(self, body: bytes, names: MetricNames) -> EngineSignals:
        return parse_signals(body.decode("utf-8"), names, self.max_series)

    async def _loop(self, address: str) -> None:
        await asyncio.sleep(self._rng.uniform(0, self.interval))
        me = asyncio.current_task()
        while self._started and self._tasks.get(address) is me:  # also ends if a cancel is ever lost
            start = time.monotonic()
            await self.scrape_once(address)
            delay = self.interval * self._rng.uniform(0.9, 1.1) - (time.monotonic() - start)
            await asyncio.sleep(max(delay, self.interval * 0.1))
