"""`epp bench dashboard`: what an open dashboard costs epp, measured on a running process.

epp (`epp serve`, its own process) in front of a simulated fleet, no Envoy: its CPU time (/proc)
over the same window with no page open, one, and eight (clients reading /dashboard/events as a
browser's EventSource does), each after a few requests so there are decisions to show.
"""

from __future__ import annotations

import asyncio
import json
import platform
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from epp.bench.procs import start_epp, start_sim, stop, tree_cpu_seconds
from epp.stack.local import free_ports


async def _viewer(url: str, events: list[int], stop_at: float) -> None:
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        while time.monotonic() < stop_at:
            line = await r.content.readline()
            if not line:
                break
            if line.startswith(b"data:"):
                events.append(len(line))


async def bench_dashboard(out: Path, *, servers: int = 8, seconds: float = 10.0) -> list[dict[str, Any]]:
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="epp-bench-dash-") as tmp:
        work = Path(tmp)
        ports = free_ports(servers + 3)
        endpoints = [f"127.0.0.1:{p}" for p in ports[:servers]]
        procs: list[subprocess.Popen[bytes]] = []
        try:
            procs.append(await start_sim(ports[:servers], work))
            grpc, health, metrics = ports[servers:]
            epp = await start_epp(endpoints, grpc, health, metrics, work)
            procs.append(epp)
            url = f"http://127.0.0.1:{metrics}/dashboard/events"
            for viewers in (0, 1, 8, 0):
                events: list[int] = []
                await asyncio.sleep(1.0)  # the previous round's pages are closed
                c0, t0 = tree_cpu_seconds(epp.pid), time.monotonic()
                tasks = [asyncio.create_task(_viewer(url, events, t0 + seconds)) for _ in range(viewers)]
                await asyncio.sleep(seconds)
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                cpu = tree_cpu_seconds(epp.pid) - c0
                elapsed = time.monotonic() - t0
                rows.append({"viewers": viewers, "seconds": round(elapsed, 1), "epp_cpu_ms_per_s": round(
                    cpu / elapsed * 1000, 2), "events": len(events),
                    "event_bytes": round(sum(events) / len(events)) if events else 0})
        finally:
            for p in reversed(procs):
                stop(p)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": platform.machine(), "servers": servers,
            "seconds": seconds}
    (out / "dashboard.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"# epp bench dashboard ({meta['date']}, {servers} simulated pods, {seconds:.0f} s each)", "",
             "| pages open | epp CPU ms per s | events | bytes per event |", "|---|---|---|---|"]
    lines += [f"| {r['viewers']} | {r['epp_cpu_ms_per_s']} | {r['events']} | {r['event_bytes']} |" for r in rows]
    (out / "dashboard.md").write_text("\n".join(lines) + "\n")
    return rows
