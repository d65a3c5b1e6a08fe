"""`epp bench sim`: does the simulator make routing matter? And can it simulate 1,000 servers?

Routing effect: one in-process fleet (h100-llama8b preset by default), a shared-prefix workload
whose working set (groups x prefix tokens) is larger than one server's KV cache but fits the
fleet's, and two routings of the same seeded trace, each on a fresh fleet:
- round robin: every server sees every prefix, so caches thrash and prefills queue;
- prefix-affine: each group always goes to one server (hash of the group), so prompts hit.
Capacity is measured first (closed loop, round robin); both runs then use open-loop Poisson
arrivals at ``load`` x that capacity. TTFT comes from the engines (arrival -> first token).

Scale: N servers (fast preset) in this process; RSS and CPU at idle and under light load.
"""

from __future__ import annotations

import asyncio
import json
import random
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from epp.sim.fleet import Fleet
from epp.sim.profiles import EngineParams, profile
from epp.stack.local import free_ports


@dataclass
class Workload:
    groups: int = 120
    prefix_tokens: int = 8000
    question_tokens: int = 60
    output_tokens: int = 48
    seed: int = 1

    def prompts(self, n: int) -> list[tuple[int, str]]:
        rng = random.Random(self.seed)
        words = [f"w{i:03d}" for i in range(1000)]
        prefixes = []
        for g in range(self.groups):
            r = random.Random(self.seed * 1000 + g)
            # " wNNN" is two 4-char pieces for the simulator's tokenizer.
            prefixes.append(f"group {g}:" + "".join(" " + r.choice(words) for _ in range(self.prefix_tokens // 2)))
        out = []
        for i in range(n):
            g = rng.randrange(self.groups)
            q = "".join(" " + rng.choice(words) for _ in range(self.question_tokens // 2))
            out.append((g, f"{prefixes[g]} question {i}:{q}"))
        return out


def _pct(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))]


class _Recorder:
    def __init__(self, fleet: Fleet) -> None:
        self.ttft: list[float] = []
        self.queue: list[float] = []
        for srv in fleet.servers:
            orig = srv.engine._observe

            def observe(name: str, v: float, orig: Any = orig) -> None:
                orig(name, v)
                if name == "ttft":
                    self.ttft.append(v)
                elif name == "queue":
                    self.queue.append(v)

            srv.engine._observe = observe


async def _send(s: aiohttp.ClientSession, url: str, prompt: str, max_tokens: int,
                model: str = "meta-llama/Llama-3.1-8B-Instruct") -> tuple[int, int]:
    body = orjson.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True})
    async with s.post(url, data=body, headers={"content-type": "application/json"}) as r:
        data = await r.read()
        if r.status != 200:
            return r.status, 0
        return 200, orjson.loads(data)["usage"]["prompt_tokens_details"]["cached_tokens"]


async def _capacity(params: EngineParams, servers: int, wl: Workload, seconds: float) -> float:
    """Requests/s the fleet completes under round robin with plenty of concurrency."""
    fleet = Fleet(free_ports(servers), params)
    await fleet.start()
    try:
        trace = wl.prompts(100_000)
        done = 0
        stop = time.monotonic() + seconds
        idx = 0
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
            async def worker() -> None:
                nonlocal done, idx
                while time.monotonic() < stop:
                    i = idx
                    idx += 1
                    srv = fleet.servers[i % servers]
                    await _send(s, f"http://{srv.address}/v1/completions", trace[i][1], wl.output_tokens)
                    done += 1

            start = time.monotonic()
            await asyncio.gather(*(worker() for _ in range(servers * 32)))
            return done / (time.monotonic() - start)
    finally:
        await fleet.stop()


async def _run(policy: str, params: EngineParams, servers: int, trace: list[tuple[int, str]], rate: float,
               wl: Workload, seed: int) -> dict[str, Any]:
    fleet = Fleet(free_ports(servers), params)
    await fleet.start()
    rec = _Recorder(fleet)
    rng = random.Random(seed)
    statuses: dict[int, int] = {}
    cached: list[int] = []
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
            tasks = []
            t0 = time.monotonic()
            next_at = t0
            for i, (group, prompt) in enumerate(trace):
                next_at += rng.expovariate(rate)
                delay = next_at - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                srv = fleet.servers[i % servers] if policy == "round-robin" else fleet.servers[group % servers]
                tasks.append(asyncio.ensure_future(_send(s, f"http://{srv.address}/v1/completions", prompt,
                                                         wl.output_tokens)))
            results = await asyncio.gather(*tasks)
            elapsed = time.monotonic() - t0
        for st, c in results:
            statuses[st] = statuses.get(st, 0) + 1
            cached.append(c)
        hits = sum(s.engine.stats.prefix_hits for s in fleet.servers)
        queries = sum(s.engine.stats.prefix_queries for s in fleet.servers)
        return {
            "policy": policy, "requests": len(trace), "offered_rps": round(rate, 2),
            "achieved_rps": round(len(trace) / elapsed, 2), "errors": sum(v for k, v in statuses.items() if k != 200),
            "ttft_p50_s": round(_pct(rec.ttft, 50), 4), "ttft_p90_s": round(_pct(rec.ttft, 90), 4),
            "ttft_p99_s": round(_pct(rec.ttft, 99), 4), "queue_p90_s": round(_pct(rec.queue, 90), 4),
            "prefix_hit_rate": round(hits / queries, 3) if queries else 0.0,
            "preemptions": sum(s.engine.stats.preemptions for s in fleet.servers),
        }
    finally:
        await fleet.stop()


async def bench_routing_effect(out: Path, *, preset: str = "h100-llama8b", servers: int = 4, load: float = 0.9,
                               requests: int = 600, capacity_seconds: float = 20.0,
                               wl: Workload | None = None) -> dict[str, Any]:
    wl = wl or Workload()
    params = profile(preset)
    cap = await _capacity(params, servers, wl, capacity_seconds)
    rate = cap * load
    trace = wl.prompts(requests)
    rows = [await _run(policy, params, servers, trace, rate, wl, seed=7) for policy in ("round-robin", "prefix-affine")]
    result: dict[str, Any] = {
        "meta": {"date": time.strftime("%Y-%m-%d %H:%M"), "preset": preset, "servers": servers, "load": load,
                 "capacity_rps_round_robin": round(cap, 2), "workload": wl.__dict__,
                 "kv_tokens_per_server": params.num_gpu_blocks * params.block_size},
        "rows": rows,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "sim-routing.json").write_text(json.dumps(result, indent=1))
    lines = [f"# epp bench sim ({result['meta']['date']}): {preset}, {servers} servers, load {load} of round-robin "
             f"capacity ({cap:.1f} req/s)", "",
             f"Workload: {wl.groups} prefix groups x {wl.prefix_tokens} tokens (+{wl.question_tokens} question, "
             f"{wl.output_tokens} output); KV cache {params.num_gpu_blocks * params.block_size} tokens per server.",
             "", "| routing | requests | req/s | errors | TTFT p50 s | TTFT p90 s | TTFT p99 s | queue p90 s "
             "| prefix hit rate | preemptions |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['policy']} | {r['requests']} | {r['achieved_rps']} | {r['errors']} | {r['ttft_p50_s']} "
                     f"| {r['ttft_p90_s']} | {r['ttft_p99_s']} | {r['queue_p90_s']} | {r['prefix_hit_rate']} "
                     f"| {r['preemptions']} |")
    (out / "sim-routing.md").write_text("\n".join(lines) + "\n")
    return result


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


async def bench_scale(out: Path, *, servers: int = 1000, idle_seconds: float = 10.0, load_rps: float = 100.0,
                      load_seconds: float = 10.0) -> dict[str, Any]:
    rss0 = _rss_mb()
    fleet = Fleet(free_ports(servers), profile("fast"))
    t0 = time.monotonic()
    await fleet.start()
    start_s = time.monotonic() - t0
    rss_started = _rss_mb()
    c0 = _cpu()
    await asyncio.sleep(idle_seconds)
    idle_cpu = (_cpu() - c0) / idle_seconds
    rng = random.Random(3)
    c0 = _cpu()
    sent = 0
    ok = 0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        tasks = []
        stop = time.monotonic() + load_seconds
        while time.monotonic() < stop:
            srv = fleet.servers[rng.randrange(servers)]
            tasks.append(asyncio.ensure_future(_send(s, f"http://{srv.address}/v1/completions",
                                                     f"scale test {sent}", 16, "sim-model")))
            sent += 1
            await asyncio.sleep(1 / load_rps)
        ok = sum(1 for st, _ in await asyncio.gather(*tasks) if st == 200)
    load_cpu = (_cpu() - c0) / load_seconds
    rss_loaded = _rss_mb()
    await fleet.stop()
    result = {"servers": servers, "start_seconds": round(start_s, 2), "rss_mb_before": round(rss0, 1),
              "rss_mb_started": round(rss_started, 1), "rss_mb_after_load": round(rss_loaded, 1),
              "rss_kb_per_server": round((rss_started - rss0) * 1024 / servers, 1),
              "idle_cpu_cores": round(idle_cpu, 4), "load_rps": load_rps, "requests": sent, "ok": ok,
              "load_cpu_cores": round(load_cpu, 3)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "sim-scale.json").write_text(json.dumps(result, indent=1))
    return result
