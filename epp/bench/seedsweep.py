"""``epp bench seeds``: routing configs side by side over many seeds of one workload, in virtual time.

A live ``epp bench routing`` run is one seed; near a fleet's limits one seed can land in a mode
that another does not (a run whose recomputes feed on each other), so a config's p90 can move
2-4x between seeds. This replays each config on the same N seeded traces through epp's own
director, scheduler and plugins against simulated engines (``epp.tuning.replay``: no sockets, a
virtual clock, ~5 s per 3,000 requests), and reports each config's spread: mean and median of
the per-seed TTFT p90, the seeds whose p90 is over twice the sweep's median ("bad"), p99, mean
TTFT and hit rate. The traces are the routing bench's (``epp.bench.workloads``), each session's
first turn only (a multi-turn chat's next turns depend on its answers). A sweep repeats
exactly (the replay is deterministic per seed).
"""

from __future__ import annotations

import json
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import orjson

from epp.bench.workloads import build
from epp.sim.profiles import fleet_params
from epp.sim.tokenizer import SimTokenizer, render_chat
from epp.tuning.replay import ReplayOptions, Workload, run_replay


@dataclass(frozen=True, slots=True)
class Sweep:
    workload: str
    rate: float  # requests/s
    requests: int
    fleet: str  # a preset, or a mixed fleet ("h100-llama8b*4,slow-llama8b*4")
    servers: int = 8
    path_s: float = 0.0  # the gateway's path, per request (ReplayOptions.path_s)


def first_turns(workload: str, requests: int, rate: float, seed: int) -> Workload:
    """The routing bench's trace for ``seed``, as a replay workload (first turns, streamed)."""
    trace = build(workload, requests, rate, seed)
    tok = SimTokenizer()
    model = "meta-llama/Llama-3.1-8B-Instruct"
    arrivals, headers, bodies, ids, outs = [], [], [], [], []
    for i, s in enumerate(sorted(trace.sessions, key=lambda s: s.start_s)):
        text = render_chat([{"role": "system", "content": s.system}, {"role": "user", "content": s.questions[0]}])
        arrivals.append(s.start_s)
        headers.append({"content-type": "application/json", "x-request-id": f"sweep-{i}", **s.headers})
        bodies.append(orjson.dumps({"model": model, "prompt": text, "max_tokens": s.max_tokens, "stream": True,
                                    "stream_options": {"include_usage": True}}))
        ids.append(tok.encode(text))
        outs.append(s.max_tokens)
    n = len(arrivals)
    return Workload(tuple(arrivals), tuple(headers), (0,) * n, tuple(bodies), tuple(ids), tuple(outs),
                    (True,) * n, (model,))


def _one(name: str, text: str, sweep: Sweep, seed: int) -> dict[str, Any]:
    work = first_turns(sweep.workload, sweep.requests, sweep.rate, seed)
    options = ReplayOptions(seed=seed, path_s=sweep.path_s)
    result = run_replay(text, name, work, fleet_params(sweep.fleet, sweep.servers), options)
    return {"config": name, "seed": seed, **result.summary()}


def sweep_seeds(configs: dict[str, str], sweep: Sweep, seeds: list[int], out: Path,
                processes: int = 2) -> dict[str, Any]:
    """Replay every config (name -> YAML text) on every seed; write seeds.json and seeds.md."""
    out.mkdir(parents=True, exist_ok=True)
    runs: list[dict[str, Any]] = []
    with ProcessPoolExecutor(processes, mp_context=get_context("spawn")) as pool:
        jobs = [pool.submit(_one, name, text, sweep, seed) for seed in seeds for name, text in configs.items()]
        runs = [j.result() for j in jobs]
    median_all = statistics.median(r["ttft_p90_s"] for r in runs)
    rows = []
    for name in configs:
        mine = [r for r in runs if r["config"] == name]
        p90s = [r["ttft_p90_s"] for r in mine]
        rows.append({"config": name, "seeds": len(mine), "p90_mean_s": round(statistics.fmean(p90s), 4),
                     "p90_median_s": round(statistics.median(p90s), 4), "p90_worst_s": max(p90s),
                     "bad_seeds": sum(p > 2 * median_all for p in p90s),
                     "p99_mean_s": round(statistics.fmean(r["ttft_p99_s"] for r in mine), 4),
                     "ttft_mean_s": round(statistics.fmean(r["ttft_mean_s"] for r in mine), 4),
                     "hit_rate": round(statistics.fmean(r["prefix_hit_rate"] for r in mine), 4),
                     "latency_error_p50_worst": max((e for r in mine if (e := r.get("latency_error_p50")) is not None),
                                                    default=None)})
    result = {"date": time.strftime("%Y-%m-%d %H:%M"), "workload": sweep.workload, "rate": sweep.rate,
              "requests": sweep.requests, "fleet": sweep.fleet, "path_s": sweep.path_s, "seeds": seeds,
              "bad_over_s": round(2 * median_all, 4),
              "rows": rows, "runs": runs}
    (out / "seeds.json").write_text(json.dumps(result, indent=1))
    (out / "seeds.md").write_text(markdown(result))
    return result


def _or_dash(v: float | None) -> str:
    return "-" if v is None else f"{v:g}"


def markdown(r: dict[str, Any]) -> str:
    lines = [f"# epp bench seeds ({r['date']}): {r['workload']} at {r['rate']} req/s, {r['requests']} requests, "
             f"{r['fleet']}, seeds {r['seeds'][0]}-{r['seeds'][-1]} (virtual time, first turns"
             f"{', path %g ms' % (r['path_s'] * 1000) if r.get('path_s') else ''})", "",
             "| config | seeds | TTFT p90 mean s | p90 median s | p90 worst s | bad seeds (p90 > "
             f"{r['bad_over_s']} s) | p99 mean s | TTFT mean s | hit rate | model error p50 (worst seed) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for w in r["rows"]:
        lines.append(f"| {w['config']} | {w['seeds']} | {w['p90_mean_s']} | {w['p90_median_s']} | {w['p90_worst_s']} "
                     f"| {w['bad_seeds']} | {w['p99_mean_s']} | {w['ttft_mean_s']} | {w['hit_rate']} "
                     f"| {_or_dash(w.get('latency_error_p50_worst'))} |")
    return "\n".join(lines) + "\n"
