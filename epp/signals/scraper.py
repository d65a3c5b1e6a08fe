"""Scrapes every endpoint's /metrics on an interval over a kept-alive connection per endpoint.

Each endpoint has its own cycle (start to start one interval, per-scrape timeout), run by loop
callbacks rather than a task. The cycles keep fixed phases on a grid of the interval: a small
pool's endpoints are scraped together (one loop wake-up for all of them rather than one each,
which halved the CPU an idle epp spends on 8 pods), a large pool's in groups spread over the
interval, and a random offset per process keeps replicas from scraping a pod at the same moment.
A failed or unparseable scrape marks the endpoint's signals as errored; the scheduler then avoids
it while any fresh endpoint exists. Cycles start and stop as endpoints join and leave the datastore.
"""

from __future__ import annotations

import asyncio
import functools
import heapq
import itertools
import logging
import math
import random
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass

from epp.datastore.endpoint import EngineSignals
from epp.datastore.store import Datastore
from epp.signals.httpget import MAX_BODY, HTTPGetError, KeepAliveGetter, OnResponse, Result
from epp.signals.mappings import EngineMapping, MetricNames
from epp.signals.promtext import MAX_SERIES, LayoutMemo, parse_signals
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


TICK = 0.005  # seconds: scrapes due within one tick start together
BATCH = 8  # endpoints per phase of the grid: scraped together, their parses back to back (~0.4 ms)


def phases(endpoints: int, interval: float, tick: float = TICK, batch: int = BATCH) -> int:
    """How many phases a pool of ``endpoints`` is scraped in over one interval: enough that each
    holds at most ``batch`` endpoints, and no more than the interval has ticks."""
    most = max(1, int(interval / tick))
    return max(1, min(most, math.ceil(endpoints / batch)))


def next_phase_time(now: float, interval: float, phase: float, min_gap: float) -> float:
    """The first time ``phase + k * interval`` (k an integer) at least ``min_gap`` after ``now``."""
    k = math.ceil((now + min_gap - phase) / interval)
    return phase + k * interval


class _Ticks:
    """Fires cycles at (about) their time on a shared tick: the endpoints due within one tick take
    one loop timer between them, so a large pool's scrapes go out in batches and the loop wakes
    once per tick rather than once per endpoint. A cycle fires within half a tick of its time."""

    def __init__(self, loop: asyncio.AbstractEventLoop, fire: Callable[[_Cycle], None], tick: float = TICK) -> None:
        self.loop = loop  # kept: asyncio.get_running_loop() calls getpid() on every call on 3.11
        self.fire = fire
        self.tick = tick
        self._due: dict[int, list[_Cycle]] = {}
        self._keys: list[int] = []  # a heap of the ticks in _due
        self._timer: asyncio.TimerHandle | None = None
        self._timer_key = 0

    def after(self, delay: float, cycle: _Cycle) -> None:
        loop = self.loop
        key = round((loop.time() + delay) / self.tick)  # early or late by half a tick at most: on time on average
        bucket = self._due.get(key)
        if bucket is None:
            bucket = self._due[key] = []
            heapq.heappush(self._keys, key)
        bucket.append(cycle)
        if self._timer is None or key < self._timer_key:
            self._arm(loop, key)

    def _arm(self, loop: asyncio.AbstractEventLoop, key: int) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_key = key
        self._timer = loop.call_at(key * self.tick, self._run)

    def _run(self) -> None:
        self._timer = None
        loop = self.loop
        now = math.floor(loop.time() / self.tick + 1e-6)
        keys = self._keys
        while keys and keys[0] <= now:
            for cycle in self._due.pop(heapq.heappop(keys)):
                if cycle.live:
                    try:
                        self.fire(cycle)
                    except Exception:  # one endpoint's trouble must not stop the others due with it
                        log.exception("scrape of %s could not start", cycle.address)
        if keys:
            self._arm(loop, keys[0])

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._due.clear()
        self._keys.clear()


def _body(result: Result) -> bytes:
    """The exposition of a scrape's result; raises what made it fail (a poll error)."""
    if isinstance(result, Exception):
        raise result
    status, body = result
    if status != 200:
        raise BadStatus(f"HTTP {status}")
    return body


class _Cycle:
    """One endpoint's scrape cycle: tick -> request -> response -> recorded -> tick, driven by
    callbacks (no task and no future per scrape)."""

    __slots__ = ("address", "answered", "getter", "live", "memo", "picks_at_start", "sent_at", "slot", "task")

    def __init__(self, address: str, getter: KeepAliveGetter, answered: Callable[[_Cycle, Result], None],
                 slot: int = 0) -> None:
        self.address = address
        self.getter = getter  # replaced (the old one closed, so it never answers) when a reload moves the target
        self.answered: OnResponse = functools.partial(answered, self)
        self.task: asyncio.Task[None] | None = None  # connecting, or parsing a large body in a thread
        self.sent_at: float | None = None  # a request is outstanding since
        self.slot = slot  # its phase on the grid is slot modulo the pool's phase count
        self.picks_at_start = 0
        self.live = True
        self.memo = LayoutMemo()

    def end(self) -> None:
        self.live = False  # its tick, if due, passes it by
        if self.task is not None:
            self.task.cancel()
        self.getter.close()


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
        self._cycles: dict[str, _Cycle] = {}
        self._sweeper: asyncio.Task[None] | None = None
        self._ticks: _Ticks | None = None
        self._started = False
        self._offset = random.random()  # this process's place on the grid, as a fraction of the interval
        self._slots = itertools.count()

    def reconfigure(self, engines: EngineMapping, target: ScrapeTarget, interval: float) -> None:
        """New metric names, target or interval (a config reload): from the next scrape on."""
        self.engines, self.interval = engines, interval
        if target != self.target:
            self.target = target
            for cycle in self._cycles.values():  # reconnect, perhaps to another port or with TLS
                old, cycle.getter = cycle.getter, self._getter(cycle.address, target)
                old.close()  # its outstanding request is dropped: the cycle goes on with the new one
                if cycle.sent_at is not None:
                    cycle.sent_at = None
                    self._next(cycle)

    def _getter(self, address: str, target: ScrapeTarget) -> KeepAliveGetter:
        return KeepAliveGetter(address, target.path, self.max_bytes, target.port, target.tls)

    async def start(self) -> None:
        self._ticks = _Ticks(asyncio.get_running_loop(), self._fire)
        self._started = True
        self.store.on_change(self._endpoints_changed)
        self._endpoints_changed(set(self.store.addresses()), set())
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep(), name="scrape timeouts")

    def _endpoints_changed(self, added: set[str], removed: set[str]) -> None:
        for a in removed:
            cycle = self._cycles.pop(a, None)
            if cycle is not None:
                cycle.end()
        if not self._started:
            return
        new = []
        for a in sorted(added - self._cycles.keys()):
            cycle = self._cycles[a] = _Cycle(a, self._getter(a, self.target), self._answered, next(self._slots))
            new.append(cycle)
        for cycle in new:  # (once all are counted: the first round is spread over the pool's phases too)
            self._schedule(0.0, cycle)

    async def stop(self) -> None:
        self._started = False
        await cancel_and_wait([self._sweeper])
        self._sweeper = None
        if self._ticks is not None:
            self._ticks.close()
        for cycle in self._cycles.values():
            cycle.end()
        await cancel_and_wait([c.task for c in self._cycles.values()])
        self._cycles.clear()

    # -- the cycle ---------------------------------------------------------------------------------
    def _fire(self, cycle: _Cycle) -> None:
        if not (cycle.live and self._started):
            return
        if cycle.getter.connected:
            self._send(cycle)
        else:
            cycle.task = asyncio.get_running_loop().create_task(self._connect(cycle), name=f"scrape {cycle.address}")

    async def _connect(self, cycle: _Cycle) -> None:
        getter = cycle.getter
        try:
            await getter.connect(self.timeout)
        except HTTPGetError as e:
            cycle.task = None
            self._failed(cycle.address, e)
            self._next(cycle)
            return
        cycle.task = None
        if cycle.live and getter is cycle.getter:
            self._send(cycle)
        else:  # removed, or a reload changed the target meanwhile
            getter.close()
            self._next(cycle)

    def _send(self, cycle: _Cycle) -> None:
        cycle.picks_at_start = self.store.total_picks.get(cycle.address, 0)
        cycle.sent_at = time.monotonic()
        try:
            cycle.getter.send(cycle.answered)
        except Exception as e:  # the write failed at once: this scrape fails, the cycle goes on
            cycle.sent_at = None
            cycle.getter.close()
            self._failed(cycle.address, e)
            self._next(cycle)

    def _answered(self, cycle: _Cycle, result: Result) -> None:
        cycle.sent_at = None
        if not cycle.live:
            return
        if isinstance(result, Exception) or len(result[1]) <= INLINE_PARSE_BYTES:
            try:
                self._record(cycle.address, result, cycle.picks_at_start, cycle.memo)
            finally:  # whatever recording does, the endpoint stays scraped
                self._next(cycle)
        else:
            cycle.task = asyncio.get_running_loop().create_task(self._record_large(cycle, result))

    async def _record_large(self, cycle: _Cycle, result: Result) -> None:
        try:
            await self._record_async(cycle.address, result, cycle.picks_at_start, cycle.memo)
        finally:
            cycle.task = None
            self._next(cycle)

    def _next(self, cycle: _Cycle) -> None:
        if not (cycle.live and self._started):
            return
        self._schedule(self.interval * 0.1, cycle)

    def _schedule(self, min_gap: float, cycle: _Cycle) -> None:
        """At the cycle's next phase time at least ``min_gap`` from now."""
        ticks = self._ticks
        if ticks is None:  # None until started
            return
        interval = self.interval
        count = phases(len(self._cycles), interval)
        phase = (self._offset + (cycle.slot % count) / count) * interval
        now = ticks.loop.time()
        ticks.after(next_phase_time(now, interval, phase, min_gap) - now, cycle)

    async def _sweep(self) -> None:
        """Ends the requests that outlived the timeout (checked a tenth of it apart)."""
        while True:
            await asyncio.sleep(self.timeout / 10)
            late = time.monotonic() - self.timeout
            for cycle in list(self._cycles.values()):
                if cycle.sent_at is not None and cycle.sent_at <= late:
                    cycle.getter.abandon(TimeoutError(f"no response within {self.timeout:g}s"))

    # -- one scrape's outcome ----------------------------------------------------------------------
    async def scrape_once(self, address: str) -> None:
        """Scrape ``address`` now, on a connection of its own, and record what it answered
        (outside the timed cycle, which it does not disturb)."""
        getter = self._getter(address, self.target)
        picks_at_start = self.store.total_picks.get(address, 0)
        try:
            result: Result = await getter.get(self.timeout)
        except Exception as e:  # recorded as this pod's failed scrape
            result = e
        finally:
            getter.close()
        await self._record_async(address, result, picks_at_start)

    async def _record_async(self, address: str, result: Result, picks_at_start: int,
                            memo: LayoutMemo | None = None) -> None:
        """As _record, with a large exposition read in a thread (routing gets the loop meanwhile)."""
        if isinstance(result, Exception) or len(result[1]) <= INLINE_PARSE_BYTES:
            self._record(address, result, picks_at_start, memo)
            return
        names = self._names(address)
        try:
            t0 = time.perf_counter()
            signals = await asyncio.to_thread(self._parse, _body(result), names, memo)
            if self.on_scrape is not None:
                self.on_scrape(time.perf_counter() - t0)
        except Exception as e:
            self._failed(address, e)
            return
        self._recorded(address, signals, picks_at_start)

    def _names(self, address: str) -> MetricNames:
        state = self.store.get(address)
        return self.engines.for_labels(state.labels if state is not None else {})

    def _record(self, address: str, result: Result, picks_at_start: int, memo: LayoutMemo | None = None) -> None:
        try:
            t0 = time.perf_counter()
            signals = self._parse(_body(result), self._names(address), memo)
            if self.on_scrape is not None:
                self.on_scrape(time.perf_counter() - t0)
        except Exception as e:  # whatever a pod sends, the pod fails this scrape and nothing else
            self._failed(address, e)
            return
        self._recorded(address, signals, picks_at_start)

    def _recorded(self, address: str, signals: EngineSignals, picks_at_start: int) -> None:
        state = self.store.get(address)
        if state is not None and state.error is not None:
            log.info("scrape of %s recovered", address)
        self.store.record_scrape(address, signals, picks_at_start)

    def _failed(self, address: str, e: Exception) -> None:
        kind = type(e).__name__
        reason = f"{kind}: {str(e)[:200]}" if str(e) else kind
        state = self.store.get(address)
        if state is not None and (state.error or "").partition(":")[0] != kind:
            log.warning("scrape of %s failed: %s", address, reason)  # once per change of kind
        self.store.record_scrape_error(address, reason)
        if self.on_error is not None:
            self.on_error(address, kind)

    def _parse(self, body: bytes, names: MetricNames, memo: LayoutMemo | None = None) -> EngineSignals:
        return parse_signals(body.decode("utf-8"), names, self.max_series, memo)
