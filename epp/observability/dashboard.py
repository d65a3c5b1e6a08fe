"""The live dashboard on the metrics port: ``GET /dashboard`` (one page, shipped in the package,
no CDN) and ``GET /dashboard/events`` (server-sent events: one JSON view of the pool a second).

The view is built once per tick and only while a page is open, then sent to every open page, so
the cost is one view a second whatever the number of viewers (at most ``MAX_VIEWERS``). What it
shows: each pod's signals (waiting, running, KV use, the prefix hit rate the pod reports in its
responses' usage, epp's in-flight picks and prefill tokens, freshness), the pick rate and share
per pod, the recent decisions with each scorer's score, flow control's queues, and the closed
loop of the precise prefix index.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import orjson
from aiohttp import web
from prometheus_client.core import Metric

from epp.datastore.store import Snapshot
from epp.observability.activity import Activity
from epp.observability.events import end, stream_events
from epp.observability.flowmetrics import FlowGauges

log = logging.getLogger("epp.dashboard")
MAX_VIEWERS = 32
CLOSED_LOOP = ("epp_prefix_routing_precision", "epp_prefix_routing_precise_active", "epp_prefix_routing_fallbacks",
               "epp_prefix_predicted_cached_tokens", "epp_prefix_reported_cached_tokens")


@dataclass(slots=True)
class PoolParts:
    """Where the view reads from (each read on the event loop, once a tick)."""

    pool: str
    snapshot: Callable[[], Snapshot]
    total_picks: Callable[[], dict[str, int]]
    activity: Activity
    flow: Callable[[], FlowGauges | None]  # None: flow control is off
    plugin_families: Callable[[], Iterable[Metric]]
    shadows: Callable[[], list[dict[str, Any]] | None] = lambda: None  # shadow configs' tallies (None: none)


@dataclass(slots=True)
class _Rates:
    """Picks per second per endpoint, from the totals' change since the last tick."""

    last: dict[str, int] = field(default_factory=dict)
    at: float = 0.0

    def update(self, totals: dict[str, int], now: float) -> dict[str, float]:
        span = now - self.at if self.at else 0.0
        rates = {a: (n - self.last.get(a, 0)) / span if span > 0 else 0.0 for a, n in totals.items()}
        self.last, self.at = dict(totals), now
        return rates


def pool_view(parts: PoolParts, rates: dict[str, float]) -> dict[str, Any]:
    """The pool as the page shows it (plain JSON)."""
    snap = parts.snapshot()
    totals = parts.total_picks()
    all_picks = sum(rates.values())
    pods = []
    for e in snap.endpoints:
        s = e.signals
        hits = parts.activity.hits.get(e.address)
        pods.append({
            "address": e.address, "name": e.name or e.address, "fresh": e.fresh(snap.now, snap.staleness),
            "age_s": round(snap.now - e.scraped_at, 2) if e.scraped_at else None, "error": e.error,
            "waiting": s.waiting if s else None, "running": s.running if s else None,
            "kv_usage": round(s.kv_usage, 4) if s else None,
            "prefix_hit_rate": round(hits.rate, 4) if hits is not None and hits.rate is not None else None,
            "inflight": snap.inflight.get(e.address, 0), "pending_tokens": snap.inflight_tokens.get(e.address, 0),
            "picks": totals.get(e.address, 0), "pick_rate": round(rates.get(e.address, 0.0), 2),
            "share": round(rates.get(e.address, 0.0) / all_picks, 4) if all_picks else None,
        })
    flow = parts.flow()
    queues = None
    if flow is not None:
        queues = {"queues": [{"fairness": f, "priority": p, "model": m, "requests": n, "bytes": b}
                             for (f, p, m, _t), (n, b) in sorted(flow.queued.items())],
                  "saturation": flow.saturation}
    loop: dict[str, float] = {}
    for fam in parts.plugin_families():
        if fam.name in CLOSED_LOOP or fam.name + "_total" in CLOSED_LOOP:
            for sample in fam.samples:
                loop[fam.name] = loop.get(fam.name, 0.0) + sample.value
    return {"pool": parts.pool, "time": time.time(), "picks_per_s": round(all_picks, 2), "pods": pods,
            "decisions": parts.activity.decisions(20), "flow_control": queues, "closed_loop": loop or None,
            "shadow": parts.shadows()}


class Dashboard:
    """The page and its event stream, added to the metrics server's routes."""

    def __init__(self, parts: PoolParts, interval: float = 1.0) -> None:
        self.parts = parts
        self.interval = interval
        self._viewers: set[asyncio.Queue[bytes]] = set()
        self._task: asyncio.Task[None] | None = None
        self._rates = _Rates()
        self._last: bytes | None = None  # the latest event, for a page that just opened
        self.views = 0  # views built (tests and the CPU measurement read it)

    def routes(self, app: web.Application) -> None:
        app.router.add_get("/dashboard", self._page)
        app.router.add_get("/dashboard/events", self._events)

    async def _page(self, request: web.Request) -> web.Response:
        html = resources.files("epp.observability").joinpath("dashboard.html").read_bytes()
        return web.Response(body=html, content_type="text/html", charset="utf-8",
                            headers={"cache-control": "no-cache"})

    async def _events(self, request: web.Request) -> web.StreamResponse:
        if len(self._viewers) >= MAX_VIEWERS:
            return web.json_response({"error": {"message": f"at most {MAX_VIEWERS} open dashboards",
                                                "type": "ServiceUnavailableError", "param": None, "code": 503}},
                                     status=503)
        queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=2)
        self._viewers.add(queue)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._tick())
        try:  # the latest view at once, not a tick later
            return await stream_events(request, queue, self._last or self._event(self._build()))
        finally:
            self._viewers.discard(queue)

    def _build(self) -> dict[str, Any]:
        self.views += 1
        return pool_view(self.parts, self._rates.update(self.parts.total_picks(), time.monotonic()))

    @staticmethod
    def _event(view: dict[str, Any]) -> bytes:
        return b"data: " + orjson.dumps(view) + b"\n\n"

    async def _tick(self) -> None:
        """One view a tick while a page is open; a slow page skips views rather than piling them up."""
        while self._viewers:
            await asyncio.sleep(self.interval)
            if not self._viewers:
                self._last = None
                break
            event = self._last = self._event(self._build())
            for q in list(self._viewers):
                if q.full():
                    with contextlib.suppress(asyncio.QueueEmpty):
                        q.get_nowait()
                q.put_nowait(event)

    async def stop(self) -> None:
        """End the open streams (so the server's shutdown does not wait for them) and the ticks."""
        for q in list(self._viewers):
            end(q)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
