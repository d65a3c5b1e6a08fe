"""``epp bench tune``: does the tuner's config do at least as well as the default on fresh traffic?

1. Record: the simulated fleet behind Envoy + epp (default config) serves a seeded workload in
   real time while ``epp record`` records it (the trace, with the pool's cache config).
2. Tune: ``epp tune`` on that trace (virtual time, simulated engines with the measured speed).
3. Validate: ``epp bench routing`` on a fresh trace of the same workload (another seed), the
   default config and the tuned one side by side on fresh fleets, in real time through Envoy.

The report puts the tuner's predictions next to what the live runs measured.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from epp.bench.routing import (
    RoutingOptions,
    bench_routing,
    capacity,
    drive,
    start_contender,
    summarize,
)
from epp.bench.workloads import WorkloadParams, build
from epp.sim.fleet import Fleet
from epp.sim.profiles import fleet_params
from epp.stack.local import free_ports
from epp.tuning.record import record_trace
from epp.tuning.tune import TuneOptions, tune

KEYS = ("ttft_p50_s", "ttft_p90_s", "ttft_p99_s", "prefix_hit_rate", "load_imbalance")  # reported per run


@dataclass
class TuneBenchOptions:
    preset: str = "h100-llama8b"
    servers: int = 8
    workload: str = "zipf"
    load: float = 1.2
    requests: int = 1200
    record_seed: int = 1
    fresh_seed: int = 2
    capacity_rps: float | None = None
    capacity_basis: str = "no-affinity"
    capacity_seconds: float = 20.0
    max_seconds: float = 240.0
    params: WorkloadParams = field(default_factory=WorkloadParams)
    tune: TuneOptions = field(default_factory=TuneOptions)


async def record_run(out: Path, opts: TuneBenchOptions, rate: float) -> tuple[Path, dict[str, Any]]:
    """The default epp serving the recording seed's trace, recorded: (trace file, the run's summary row)."""
    trace = build(opts.workload, opts.requests, rate, opts.record_seed, opts.params)
    per_server = fleet_params(opts.preset, opts.servers)
    fleet = Fleet(free_ports(len(per_server)), per_server)
    await fleet.start()
    work = out / "logs" / "record"
    work.mkdir(parents=True, exist_ok=True)
    path = out / "recorded-trace.jsonl"
    try:
        running = await start_contender("epp", [s.address for s in fleet.servers], work, Path(".venv-peers"))
        if isinstance(running, str):
            raise RuntimeError(f"epp did not start: {running}")
        try:
            assert running.metrics_url is not None
            ready = asyncio.Event()
            recording = asyncio.create_task(record_trace(running.metrics_url.removesuffix("/metrics"), path,
                                                         seconds=opts.max_seconds + 300, ready=ready))
            await asyncio.wait_for(ready.wait(), 15)
            cpu0 = running.cpu()
            results, elapsed, _ = await drive(running.url, trace, fleet, opts.max_seconds)
            row = summarize("epp (recorded)", opts.load, results, elapsed, fleet, running.cpu() - cpu0)
            await asyncio.sleep(1.0)  # the last records on their way
            recording.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await recording
        finally:
            running.stop()
    finally:
        await fleet.stop()
    return path, row


async def bench_tune(out: Path, opts: TuneBenchOptions) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    cap = opts.capacity_rps or await capacity(opts.preset, opts.servers, opts.workload, opts.params,
                                              opts.capacity_seconds, affinity=opts.capacity_basis == "spread")
    trace_path, recorded = await record_run(out, opts, cap * opts.load)
    tuned = await asyncio.to_thread(lambda: tune(trace_path, out / "tune", opts=opts.tune,
                                                 engine=opts.preset.split(",")[0].split("*")[0], progress=_say))
    fresh = await bench_routing(out / "fresh", RoutingOptions(
        preset=opts.preset, servers=opts.servers, loads=(opts.load,), requests=opts.requests,
        workload=opts.workload, seed=opts.fresh_seed, contenders=("epp", "epp-tuned"), capacity_rps=cap,
        capacity_basis=opts.capacity_basis, max_seconds=opts.max_seconds, params=opts.params,
        epp_configs={"tuned": out / "tune" / "best-config.yaml"}, progress=False))
    rows = {r["contender"]: r for r in fresh["rows"]}
    result = {
        "meta": {"date": time.strftime("%Y-%m-%d %H:%M"), "preset": opts.preset, "servers": opts.servers,
                 "workload": opts.workload, "load": opts.load, "requests": opts.requests,
                 "capacity_rps": round(cap, 2), "capacity_basis": opts.capacity_basis,
                 "record_seed": opts.record_seed, "fresh_seed": opts.fresh_seed,
                 "objective": opts.tune.objective, "wall_s": round(time.monotonic() - started, 1)},
        "tuned_config": tuned["best"]["config"], "current_config": tuned["current"]["config"],
        "predicted": {"default": {k: tuned["current"][k] for k in KEYS}, "tuned": {k: tuned["best"][k] for k in KEYS}},
        "recorded_run": {k: recorded[k] for k in KEYS},
        "fresh": {name: {k: rows[c][k] for k in KEYS} for name, c in (("default", "epp"), ("tuned", "epp-tuned"))
                  if c in rows},
        "unavailable": fresh["unavailable"], "tune_meta": tuned["meta"],
    }
    (out / "tune-bench.json").write_text(json.dumps(result, indent=1))
    (out / "tune-bench.md").write_text(markdown(result))
    return result


def _say(message: str) -> None:
    print(f"epp bench tune: {message}", file=sys.stderr, flush=True)


def markdown(result: dict[str, Any]) -> str:
    m = result["meta"]
    lines = [f"# epp bench tune: {m['workload']} at {m['load']}x ({m['capacity_basis']} capacity "
             f"{m['capacity_rps']} req/s), {m['servers']} x {m['preset']}, {m['requests']} requests", "",
             f"Tuned for TTFT {m['objective']} on the trace recorded from the default config (seed "
             f"{m['record_seed']}): **{result['tuned_config']}** (default: {result['current_config']}). "
             f"Validated on a fresh trace (seed {m['fresh_seed']}), both configs live through Envoy.", "",
             "| | " + " | ".join(KEYS) + " |", "|---|" + "---|" * len(KEYS)]
    rows = [("recorded run (default, live)", result["recorded_run"]),
            ("tuner's prediction: default", result["predicted"]["default"]),
            ("tuner's prediction: tuned", result["predicted"]["tuned"])]
    rows += [(f"fresh trace, live: {name}", r) for name, r in result["fresh"].items()]
    lines += [f"| {label} | " + " | ".join(str(r[k]) for k in KEYS) + " |" for label, r in rows]
    fresh = result["fresh"]
    if "default" in fresh and "tuned" in fresh:
        ratios = {k: round(fresh["tuned"][k] / fresh["default"][k], 3) if fresh["default"][k] else None
                  for k in ("ttft_p50_s", "ttft_p90_s", "ttft_p99_s")}
        lines += ["", "Tuned / default on the fresh trace: " + ", ".join(f"{k} {v}" for k, v in ratios.items())]
    return "\n".join(lines) + "\n"

