"""``epp bench workers``: picks/s at saturation with 0 (one process), 1 and 2 protocol workers.

epp (``epp serve --workers N``, its own processes) in front of 4 fast simulated pods; the load is
``epp.bench.extprocload`` (what Envoy sends in BUFFERED mode, frames built once: a few us of CPU
per pick, so epp is what saturates; no Envoy in the way). Each configuration runs ``rounds``
times in alternating order; the table has the median round. Per process: the CPU of the serving
process (the routing state) and of the workers, per pick, and the client's share of the cores,
so the floor is visible: the one process that decides cannot go faster than its own CPU per
pick allows."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from epp.bench.procs import children, cpu_seconds, start_epp, start_sim, stop
from epp.stack.local import free_ports


@dataclass
class Round:
    workers: int
    tokens: int  # 0: request only (BUFFERED, no response); else gateway-mode streams of this many chunks
    observed: bool  # each request as epp-observed.yaml's three streams (--observed-responses)
    picks: int
    errors: int
    seconds: float
    picks_per_s: float
    state_cpu_us_per_pick: float
    workers_cpu_us_per_pick: float
    client_cores: float


async def _one(workers: int, tokens: int, endpoints: list[str], workdir: Path, connections: int, streams: int,
               seconds: float, client_nice: int, observed: bool = False) -> Round:
    grpc, health, metrics = free_ports(3)
    epp = await start_epp(endpoints, grpc, health, metrics, workdir,
                          extra=("--workers", str(workers), "--dashboard=false",
                                 *(("--observed-responses",) if observed else ())))
    try:
        kids = children(epp.pid) if workers else []
        state0, kids0 = cpu_seconds(epp.pid), sum(cpu_seconds(k) for k in kids)
        cmd = [sys.executable, "-m", "epp.bench.extprocload", "127.0.0.1", str(grpc), str(connections),
               str(streams), str(seconds), str(tokens), *(("observed",) if observed else ())]
        if client_nice:
            cmd = ["nice", "-n", str(client_nice), *cmd]
        done = await asyncio.to_thread(subprocess.run, cmd, capture_output=True, text=True, timeout=seconds + 60)
        if done.returncode != 0:
            raise RuntimeError(f"load generator failed: {done.stderr[-2000:]}")
        state1, kids1 = cpu_seconds(epp.pid), sum(cpu_seconds(k) for k in kids)
    finally:
        stop(epp)
    r = json.loads(done.stdout.strip().splitlines()[-1])
    n = max(r["picks"], 1)
    return Round(workers, tokens, observed, r["picks"], r["errors"], round(r["seconds"], 2),
                 round(r["picks"] / r["seconds"], 1),
                 round((state1 - state0) / n * 1e6, 1), round((kids1 - kids0) / n * 1e6, 1),
                 round(r["client_cpu_s"] / r["seconds"], 3))


async def bench_workers(out: Path, *, workers: tuple[int, ...] = (0, 1, 2), rounds: int = 3,
                        seconds: float = 8.0, connections: int = 16, streams: int = 8,
                        client_nice: int = 0, tokens: tuple[int, ...] = (0, 64), observed: bool = False
                        ) -> dict[str, Any]:
    """``observed``: each token count also as epp-observed.yaml's three streams per request."""
    out.mkdir(parents=True, exist_ok=True)
    work = out / "logs"
    work.mkdir(exist_ok=True)
    ports = free_ports(4)
    sim = await start_sim(ports, work)
    all_rounds: list[Round] = []
    kinds = [(t, False) for t in tokens] + ([(max(t, 1), True) for t in tokens] if observed else [])
    try:
        for i in range(rounds):
            for t, seen in kinds:
                order = workers if i % 2 == 0 else tuple(reversed(workers))
                for w in order:
                    all_rounds.append(await _one(w, t, [f"127.0.0.1:{p}" for p in ports], work, connections,
                                                 streams, seconds, client_nice, seen))
    finally:
        stop(sim)
    rows = []
    for t, seen in kinds:
        base = None
        for w in workers:
            mine = sorted((r for r in all_rounds if r.workers == w and r.tokens == t and r.observed == seen),
                          key=lambda r: r.picks_per_s)
            row = mine[len(mine) // 2]
            base = row.picks_per_s if w == 0 else base
            rows.append({**asdict(row), "vs_one_process": round(row.picks_per_s / base, 2) if base else None,
                         "range": [mine[0].picks_per_s, mine[-1].picks_per_s]})
    result = {
        "meta": {"cpus": len(os.sched_getaffinity(0)), "rounds": rounds, "seconds": seconds,
                 "connections": connections, "streams_per_connection": streams, "client_nice": client_nice,
                 "pods": 4, "load": "epp.bench.extprocload: a 2.4 KB completion request; tokens 0: BUFFERED, no "
                                    "response processing; tokens N: FULL_DUPLEX_STREAMED both ways, N SSE chunks; "
                                    "observed: epp-observed.yaml's three streams per request (the pick in "
                                    "FULL_DUPLEX_STREAMED with the response headers, the first observer with the "
                                    "first chunk and the rest only when read on, the end observer)"},
        "rows": rows,
        "rounds": [asdict(r) for r in all_rounds],
    }
    (out / "workers.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "workers.md").write_text(markdown(result))
    return result


def markdown(result: dict[str, Any]) -> str:
    m = result["meta"]
    lines = [f"# epp bench workers ({m['cpus']} cores, {m['pods']} fast simulated pods, median of {m['rounds']} "
             f"rounds of {m['seconds']:g} s)", "",
             f"Load: {m['load']}; {m['connections']} connections x {m['streams_per_connection']} streams open; "
             f"the client at nice {m['client_nice']} in its own process.", "",
             "| request | workers | picks/s | vs one process | min-max | errors | state CPU us/pick | "
             "workers CPU us/pick | client cores |", "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        kind = f"{r['tokens']}-token stream" if r["tokens"] else "request only"
        if r.get("observed"):
            kind += ", observed"
        lo, hi = r["range"]
        lines.append(f"| {kind} | {r['workers'] or '0 (one process)'} | {r['picks_per_s']:,.0f} | "
                     f"{r['vs_one_process']} | {lo:,.0f}-{hi:,.0f} | {r['errors']} | {r['state_cpu_us_per_pick']} | "
                     f"{r['workers_cpu_us_per_pick']} | {r['client_cores']} |")
    lines.append("")
    return "\n".join(lines)
