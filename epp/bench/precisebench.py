"""`epp bench precise`: approximate vs precise prefix routing under churn, in one run.

One seeded trace of shared-prefix chat requests (simbench.Workload) is replayed against a fresh
simulated fleet (h100 preset by default, KV events on) for each routing:
- round robin (baseline);
- epp, default profile (approximate prefix-cache-scorer);
- epp, precise-prefix-cache-scorer fed by the fleet's KV events, with the closed loop.
Churn is the same for each: every ``restart_every`` seconds one pod crashes and comes back empty
``down_for`` seconds later, and ``side_fraction`` of the requests go straight to a random pod
(traffic epp did not route: it fills and evicts caches behind epp's back). epp runs in this
process (PickerServer: scraper, KV-event subscribers, scheduler, closed loop); requests skip
Envoy, which does not change where they go. TTFT is measured by the client on streams (time to
the first content chunk) for the requests the router placed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from epp.bench.routing import chat_body, stream_chat
from epp.bench.simbench import Workload, _capacity, _pct
from epp.config import load_config, parse_config, precise_config
from epp.requestcontrol.refused import Refused
from epp.requestcontrol.routed import RequestInput
from epp.scheduling.precise_scorer import PrecisePrefixCacheScorer
from epp.server.app import PickerServer, ServeOptions
from epp.sim.fleet import Fleet
from epp.sim.kvevents import KVEventsConfig
from epp.sim.profiles import EngineParams, profile
from epp.stack.local import free_ports, wait_until


@dataclass
class Churn:
    side_fraction: float = 0.3
    restart_every: float = 6.0
    down_for: float = 0.5


@dataclass
class _Result:
    ttft: float | None
    status: int
    cached: int
    side: bool


async def _stream(s: aiohttp.ClientSession, addr: str, body: bytes) -> tuple[int, float | None, int]:
    """(status, seconds to the first content chunk, cached tokens) of one streamed chat."""
    res, _ = await stream_chat(s, f"http://{addr}", body)
    return res.status, res.ttft_s, res.cached_tokens


def _body(model: str, prompt: str, output_tokens: int) -> bytes:
    return chat_body(model, [{"role": "user", "content": prompt}], output_tokens)


async def _run(routing: str, params: EngineParams, servers: int, trace: list[tuple[int, str]], rate: float,
               wl: Workload, churn: Churn, seed: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="epp-precise-") as kv_dir:
        kv = KVEventsConfig(True, "zmq", f"ipc://{kv_dir}/kv-{{port}}.sock", f"ipc://{kv_dir}/replay-{{port}}.sock")
        fleet = Fleet(free_ports(servers), params, kv_events=kv)
        await fleet.start()
        picker = None
        if routing != "round-robin":
            cfg = (parse_config(precise_config("sim", f"ipc://{kv_dir}/kv-{{port}}.sock",
                                               f"ipc://{kv_dir}/replay-{{port}}.sock"))
                   if routing == "epp-precise" else load_config(None))
            ports = free_ports(3)
            picker = PickerServer(ServeOptions(config=cfg, endpoints=tuple(s.address for s in fleet.servers),
                                               host="127.0.0.1", grpc_port=ports[0], grpc_health_port=ports[1],
                                               metrics_port=ports[2], secure_serving=False))
            await picker.start()
            p = picker

            async def fresh() -> bool:
                return p.store.fresh_count() == servers

            await wait_until(fresh, 10, "fresh metrics")
        model = params.names()[0]
        rng = random.Random(seed)
        side_rng = random.Random(seed + 1)  # the same requests go straight to the same pods in every run
        sides = [side_rng.randrange(servers) if side_rng.random() < churn.side_fraction else None for _ in trace]
        results: list[_Result] = []
        rr = 0

        async def route(s: aiohttp.ClientSession, prompt: str) -> None:
            nonlocal rr
            body = _body(model, prompt, wl.output_tokens)
            if picker is None:
                addr = fleet.servers[rr % servers].address
                rr += 1
                status, ttft, cached = await _stream(s, addr, body)
                results.append(_Result(ttft, status, cached, False))
                return
            try:
                pick = picker.director.route(RequestInput({}, "/v1/chat/completions", body))
            except Refused as e:
                results.append(_Result(None, e.status, 0, False))
                return
            try:
                status, ttft, cached = await _stream(s, pick.decision.primary, body)
                if status == 200:
                    pick.usage(cached)
            finally:
                pick.finish()
            results.append(_Result(ttft, status, cached, False))

        async def side(s: aiohttp.ClientSession, prompt: str, server: int) -> None:
            addr = fleet.servers[server].address
            body = _body(model, prompt, wl.output_tokens)
            status, ttft, cached = await _stream(s, addr, body)
            results.append(_Result(ttft, status, cached, True))

        async def restarts() -> None:
            i = 0
            while True:
                await asyncio.sleep(churn.restart_every)
                await fleet.servers[i % servers].crash(churn.down_for)
                i += 1

        restarter = asyncio.create_task(restarts()) if churn.restart_every > 0 else None
        try:
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                             timeout=aiohttp.ClientTimeout(total=120)) as s:
                tasks = []
                t0 = time.monotonic()
                next_at = t0
                for (_, prompt), direct in zip(trace, sides, strict=True):
                    next_at += rng.expovariate(rate)
                    delay = next_at - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    tasks.append(asyncio.ensure_future(side(s, prompt, direct) if direct is not None
                                                       else route(s, prompt)))
                await asyncio.gather(*tasks)
                elapsed = time.monotonic() - t0
        finally:
            if restarter is not None:
                restarter.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await restarter
        routed = [r for r in results if not r.side]
        ttft = [r.ttft for r in routed if r.ttft is not None]
        row: dict[str, Any] = {
            "routing": routing, "requests": len(trace), "routed": len(routed), "side": len(results) - len(routed),
            "achieved_rps": round(len(trace) / elapsed, 2),
            "errors_routed": sum(1 for r in routed if r.status != 200),
            "ttft_p50_s": round(_pct(ttft, 50), 4), "ttft_p90_s": round(_pct(ttft, 90), 4),
            "ttft_p99_s": round(_pct(ttft, 99), 4),
            "cached_token_share_routed": round(sum(r.cached for r in routed) / max(1, len(routed)), 1),
        }
        if picker is not None:
            e2e = picker.metrics.scheduler_e2e
            total = sum(x.value for m in e2e.collect() for x in m.samples if x.name.endswith("_sum"))
            row["pick_ms_per_request"] = round(1000 * total / max(1, len(routed)), 3)
            scorers = picker.director.scheduler.profile.scorers
            sc = next((x for x, _ in scorers if isinstance(x, PrecisePrefixCacheScorer)), None)
            if sc is not None:
                t = sc.tracker
                row["routing_precision_window"] = None if t.precision is None else round(t.precision, 3)
                evidence = max(t.totals.predicted_tokens, t.totals.actual_tokens)
                row["routing_precision_all"] = round(t.totals.agreed_tokens / evidence, 3) if evidence else None
                row["precise_trusted_at_end"] = t.trusted
                row["kv_event_restarts_seen"] = picker.kv_events.totals().restarts
            await picker.stop(grace=0.1)
        await fleet.stop()
        return row


async def bench_precise(out: Path, *, preset: str = "h100-llama8b", servers: int = 4, load: float = 0.9,
                        requests: int = 600, capacity_seconds: float = 15.0, wl: Workload | None = None,
                        churn: Churn | None = None,
                        routings: tuple[str, ...] = ("round-robin", "epp-approximate", "epp-precise"),
                        ) -> dict[str, Any]:
    wl = wl or Workload()
    churn = churn or Churn()
    params = profile(preset)
    cap = await _capacity(params, servers, wl, capacity_seconds)
    rate = cap * load
    trace = wl.prompts(requests)
    rows = [await _run(r, params, servers, trace, rate, wl, churn, seed=11) for r in routings]
    result: dict[str, Any] = {
        "meta": {"date": time.strftime("%Y-%m-%d %H:%M"), "preset": preset, "servers": servers, "load": load,
                 "capacity_rps_round_robin": round(cap, 2), "workload": wl.__dict__, "churn": churn.__dict__},
        "rows": rows,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "precise.json").write_text(json.dumps(result, indent=1))
    lines = [f"# epp bench precise ({result['meta']['date']}): {preset}, {servers} servers, load {load} of "
             f"round-robin capacity ({cap:.1f} req/s)", "",
             f"Workload: {wl.groups} prefix groups x {wl.prefix_tokens} tokens; churn: {churn.side_fraction:.0%} of "
             f"requests sent straight to a random pod, one pod restarting every {churn.restart_every}s "
             f"(down {churn.down_for}s).", "",
             "| routing | routed | errors | TTFT p50 s | TTFT p90 s | TTFT p99 s | cached tokens/req | precision "
             "| pick ms/req |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        precision = r.get("routing_precision_all")
        lines.append(f"| {r['routing']} | {r['routed']} | {r['errors_routed']} | {r['ttft_p50_s']} | "
                     f"{r['ttft_p90_s']} | {r['ttft_p99_s']} | {r['cached_token_share_routed']} | "
                     f"{'-' if precision is None else precision} | {r.get('pick_ms_per_request', '-')} |")
    (out / "precise.md").write_text("\n".join(lines) + "\n")
    return result
