"""``epp bench pool``: one epp in front of a large pool (the simulator's fast preset, 1,000 pods).

Three numbers, each for the pool size given:
- scraping: epp (its own process) scrapes every pod at the refresh interval; its CPU over a window
  and the scrapes it completed (``epp_metrics_scrape_parse_seconds_count``) give the CPU per scrape
  and the cores a full-rate scrape needs (pods / interval x CPU per scrape). Twice: against the
  simulated fleet (which cannot answer as fast as 1,000 pods at 50 ms ask, so epp idles between
  answers and each scrape carries a wakeup), and at the full rate against servers answering the
  exposition one simulated pod sent (``epp.bench.cannedmetrics``): the cores epp uses there are
  the measured cost of the interval;
- picking: the default profile's pick (schedule + commit) over that many fresh candidates, in
  process, wall time per pick: p50 and p99;
- memory: the approximate prefix index holding a million blocks spread over the pool (RSS growth).
"""

from __future__ import annotations

import asyncio
import gc
import json
import random
import re
import resource
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

from epp.bench.procs import stop, tree_cpu_seconds
from epp.bench.schedcost import PROFILES, _pool, _requests
from epp.config import parse_config
from epp.scheduling.prefix_index import PrefixIndex
from epp.sim.fleet import Fleet
from epp.sim.profiles import profile
from epp.stack.local import endpoints_yaml, epp_command, free_ports, spawn, wait_until

_PARSED = re.compile(rb"^epp_metrics_scrape_parse_seconds_count(?:\{[^}]*\})? ([0-9.e+]+)$", re.M)


async def _scrapes(s: aiohttp.ClientSession, url: str) -> float:
    async with s.get(url) as r:
        return sum(float(m) for m in _PARSED.findall(await r.read()))


async def scraping(out: Path, servers: int, interval: float, seconds: float) -> dict[str, Any]:
    fleet = Fleet(free_ports(servers), profile("fast"))
    await fleet.start()
    try:
        return await _measure(out, [s.address for s in fleet.servers], interval, seconds)
    finally:
        await fleet.stop()


async def scraping_full_rate(out: Path, servers: int, interval: float, seconds: float) -> dict[str, Any]:
    """The same measurement against canned servers answering a fast-preset pod's exposition."""
    fleet = Fleet(free_ports(1), profile("fast"))
    await fleet.start()
    try:
        async with aiohttp.ClientSession() as s, s.get(f"http://{fleet.servers[0].address}/metrics") as r:
            body = await r.read()
    finally:
        await fleet.stop()
    work = out / "logs"
    work.mkdir(parents=True, exist_ok=True)
    (work / "exposition.txt").write_bytes(body)
    listing = work / "canned-addresses.json"
    listing.unlink(missing_ok=True)
    canned = spawn([sys.executable, "-m", "epp.bench.cannedmetrics", "--count", str(servers), "--body",
                    str(work / "exposition.txt"), "--addresses-out", str(listing)], work / "canned.log")
    try:
        async def listed() -> bool:
            return listing.exists()

        await wait_until(listed, 60, "the canned /metrics servers")
        result = await _measure(out, json.loads(listing.read_text()), interval, seconds)
        result["exposition_bytes"] = len(body)
        return result
    finally:
        stop(canned)


async def _measure(out: Path, addresses: list[str], interval: float, seconds: float) -> dict[str, Any]:
    servers = len(addresses)
    work = out / "logs"
    work.mkdir(parents=True, exist_ok=True)
    eps = work / "endpoints.yaml"
    eps.write_text(endpoints_yaml(addresses))
    grpc, health, metrics = free_ports(3)
    proc = spawn(epp_command("serve", "--endpoints-file", str(eps), "--secure-serving=false", "--grpc-port", str(grpc),
                             "--grpc-health-port", str(health), "--metrics-port", str(metrics),
                             "--refresh-metrics-interval", f"{int(interval * 1000)}ms", "--dashboard=false"),
                 work / "epp.log")
    url = f"http://127.0.0.1:{metrics}/metrics"
    try:
        async with aiohttp.ClientSession() as s:
            async def up() -> bool:
                return await _scrapes(s, url) >= servers  # every pod scraped once

            await wait_until(up, 60, "epp scraping every pod")
            n0, c0, t0 = await _scrapes(s, url), tree_cpu_seconds(proc.pid), time.monotonic()
            await asyncio.sleep(seconds)
            n1, c1, t1 = await _scrapes(s, url), tree_cpu_seconds(proc.pid), time.monotonic()
    finally:
        stop(proc)
    rate, cores = (n1 - n0) / (t1 - t0), (c1 - c0) / (t1 - t0)
    per_scrape = (c1 - c0) / (n1 - n0) if n1 > n0 else None
    wanted = servers / interval
    return {"servers": servers, "interval_s": interval, "scrapes_per_s": round(rate, 1),
            "scrapes_wanted_per_s": round(wanted, 1), "epp_cores": round(cores, 3),
            "cpu_us_per_scrape": round(per_scrape * 1e6, 1) if per_scrape else None,
            "cores_for_full_rate": round(wanted * per_scrape, 2) if per_scrape else None}


def picking(servers: int, picks: int = 1000) -> dict[str, Any]:
    now = time.monotonic()
    pools = [_pool(servers, now, shift) for shift in range(7)]
    requests = _requests(picks + 200)
    scheduler, _ = parse_config(PROFILES["default"]).build()
    for i, r in enumerate(requests[:200]):  # warm the prefix index
        scheduler.committed(scheduler.schedule(r, pools[i % 7]))
    gc.collect()
    times = []
    for i, r in enumerate(requests[200:]):
        t0 = time.perf_counter()
        scheduler.committed(scheduler.schedule(r, pools[i % 7]))
        times.append(time.perf_counter() - t0)
    times.sort()
    return {"candidates": servers, "picks": len(times), "pick_p50_us": round(times[len(times) // 2] * 1e6),
            "pick_p99_us": round(times[int(len(times) * 0.99)] * 1e6)}


def memory(servers: int, blocks: int = 1_000_000) -> dict[str, Any]:
    gc.collect()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    index = PrefixIndex(lru_capacity=blocks)  # (per endpoint: nothing is evicted here)
    rng = random.Random(1)
    addresses = [f"10.0.{i // 250}.{i % 250}:8000" for i in range(servers)]
    per_record = 64
    for _ in range(blocks // per_record):
        index.record(rng.choice(addresses), [rng.getrandbits(63) for _ in range(per_record)])
    gc.collect()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"blocks_recorded": blocks // per_record * per_record, "index_size": index.size(),
            "rss_growth_mb": round((after - before) / 1024, 1)}


async def bench_pool(out: Path, servers: int = 1000, interval: float = 0.05, seconds: float = 10.0,
                     blocks: int = 1_000_000) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    result = {"date": time.strftime("%Y-%m-%d %H:%M"), "picking": picking(servers),
              "memory": memory(servers, blocks),
              "scraping": await scraping(out, servers, interval, seconds),
              "scraping_full_rate": await scraping_full_rate(out, servers, interval, seconds)}
    (out / "pool.json").write_text(json.dumps(result, indent=1))
    (out / "pool.md").write_text(markdown(result))
    return result


def markdown(r: dict[str, Any]) -> str:
    p, m, s, f = r["picking"], r["memory"], r["scraping"], r["scraping_full_rate"]
    return "\n".join([
        f"# epp bench pool: {p['candidates']} endpoints ({r['date']})", "",
        "| what | measured |", "|---|---|",
        f"| pick (default profile, schedule + commit) | p50 {p['pick_p50_us']} us, p99 {p['pick_p99_us']} us |",
        f"| prefix index with {m['blocks_recorded']:,} blocks | RSS +{m['rss_growth_mb']} MB |",
        f"| scraping every {s['interval_s'] * 1000:.0f} ms | {s['scrapes_per_s']} scrapes/s of "
        f"{s['scrapes_wanted_per_s']} wanted, epp {s['epp_cores']} cores, {s['cpu_us_per_scrape']} us per scrape: "
        f"{s['cores_for_full_rate']} cores at the full rate (simulated fleet) |",
        f"| scraping every {f['interval_s'] * 1000:.0f} ms, full rate (a fast-preset pod's "
        f"{f['exposition_bytes']:,}-byte exposition from canned servers) | {f['scrapes_per_s']} scrapes/s of "
        f"{f['scrapes_wanted_per_s']} wanted, epp {f['epp_cores']} cores, {f['cpu_us_per_scrape']} us per scrape |",
        ""])
