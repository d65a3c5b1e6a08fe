"""`epp bench overload`: flow control off vs on (and the peers), on the same seeded traces, in one run.

Scenarios, on a fresh simulated fleet each (a100 preset, 4 pods by default: see OverloadOptions),
Envoy + epp as in `epp bench routing` (the router on its own core), answers of 16 tokens:

- ``overload``: the mixed workload, bursty, at 1.6x the fleet's capacity. Goodput = requests meeting the
  SLO (TTFT <= 1 s and TPOT <= 50 ms) per second; TTFT of the requests served; every refusal by
  status and drop reason (a request that neither succeeds nor gets a status counts as timed out).
  vllm-router and sglang-router (cache_aware) run the same trace where they install.
- ``priority``: 1.4x, a quarter of the sessions critical (an InferenceObjective of priority 10):
  the critical requests' TTFT p90 with flow control off, on, and alone on the fleet (idle).
- ``fairness``: tenant A offers 0.9x capacity and tenant B 0.3x, round-robin fairness: B's TTFT
  p90 against B alone, and A's output tokens/s against the capacity left by B.
- ``scale-from-zero``: the pool has no endpoint for the first 5 s, then all of them; requests
  keep arriving. With flow control they wait (noEndpointRequestTTL); without, they get 503.
- ``queue``: in process, the cost of one enqueue + one dispatch with 0, 1,000 and 100,000
  requests queued (1 and 100 flows, both fairness policies).
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import random
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from epp.bench.routing import (
    RequestResult,
    Running,
    _place,
    capacity,
    drive,
    epp_behind_envoy,
    split_cores,
    start_contender,
    summarize,
)
from epp.bench.simbench import _pct
from epp.bench.workloads import Trace, WorkloadParams, build
from epp.sim.fleet import Fleet
from epp.sim.profiles import profile
from epp.stack.local import free_ports

SCENARIOS = ("overload", "priority", "fairness", "scale-from-zero", "queue", "eviction")
DEFAULT_SCENARIOS = SCENARIOS[:5]  # (eviction: on request)
PEERS = ("vllm-router", "sglang-router")
CRITICAL_OBJECTIVE = """\
apiVersion: llm-d.ai/v1alpha2
kind: InferenceObjective
metadata: {name: critical}
spec: {priority: 10, poolRef: {name: default}}
"""
SHEDDABLE_OBJECTIVE = CRITICAL_OBJECTIVE + """---
apiVersion: llm-d.ai/v1alpha2
kind: InferenceObjective
metadata: {name: batch}
spec: {priority: -1, poolRef: {name: default}}
"""


DETECTORS = {
    # The reference's default detector and thresholds (scraped queue 5, KV 0.8).
    "utilization": "- type: utilization-detector\n  name: detector\n  parameters: {metricsStalenessThreshold: 1s}\n",
    # epp's own account of each pod's in-flight requests and of the prompt tokens it still has to
    # prefill (uncached ones): the work ahead of a new request's first token. 2,000 tokens are
    # ~160 ms of prefill on the a100 preset: a pod takes one cold prompt or a few warm ones at a
    # time (4,500 let two cold prompts share each 500 ms step, and every decode in it waited too).
    "concurrency": "- type: concurrency-detector\n  name: detector\n"
                   "  parameters: {concurrencyMode: hybrid, maxConcurrency: 64, maxTokenConcurrency: 2000}\n",
}


def flow_config(ttl: str, fairness: str = "global-strict-fairness-policy", no_endpoint_ttl: str = "30s",
                detector: str = "concurrency", holdback: float | None = None,
                ordering: str = "least-prefill-ordering-policy", evict: str | None = None) -> str:
    """The default profile with flow control on: the detector (also a filter of the profile), a
    queue budget ``ttl``, the bands' ``ordering``; with ``holdback``, the priority-holdback usage
    limit (lower bands gated from that saturation, the top band at 1.0); with ``evict`` (an
    eviction ordering policy type), in-flight eviction in that order."""
    kind, _, params = detector.partition(":")
    spec = DETECTORS[kind] if not params else f"- type: {kind}-detector\n  name: detector\n  parameters: {params}\n"
    return f"""\
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
featureGates: [flowControl]
plugins:
- type: queue-scorer
- type: kv-cache-utilization-scorer
- type: prefix-cache-scorer
- type: max-score-picker
{spec}- type: {fairness}
- type: {ordering}
{f"- type: {evict}{chr(10)}" if evict else ""}\
{f"- type: priority-holdback-policy{chr(10)}  parameters: {{minCeiling: {holdback}}}{chr(10)}" if holdback else ""}
schedulingProfiles:
- name: default
  plugins:
  - {{pluginRef: detector}}
  - {{pluginRef: queue-scorer, weight: 2}}
  - {{pluginRef: kv-cache-utilization-scorer, weight: 2}}
  - {{pluginRef: prefix-cache-scorer, weight: 3}}
  - {{pluginRef: max-score-picker}}
flowControl:
  saturationDetector: {{pluginRef: detector}}
  defaultRequestTTL: {ttl}
  noEndpointRequestTTL: {no_endpoint_ttl}
  defaultPriorityBand: {{fairnessPolicyRef: {fairness}, orderingPolicyRef: {ordering}}}
{"  usageLimitPolicyPluginRef: priority-holdback-policy" + chr(10) if holdback else ""}\
{"  enableEviction: true" + chr(10) if evict else ""}"""


@dataclass
class OverloadOptions:
    # a100 x 4 (not h100 x 8): at 1.6x an h100 fleet of 8 asks more requests/s than this 2-core
    # host can simulate and route at once (the simulated GPUs ran 50-150 ms per step behind).
    preset: str = "a100-llama8b"
    servers: int = 4
    requests: int = 800
    seed: int = 1
    scenarios: tuple[str, ...] = DEFAULT_SCENARIOS
    peers: bool = True
    ttl: str = "400ms"  # the queue budget: under the TTFT SLO, so a request served is served in time
    slo_ttft_s: float = 1.0
    slo_tpot_s: float = 0.05
    capacity_rps: float | None = None
    capacity_seconds: float = 20.0
    max_seconds: float = 180.0
    detector: str = "concurrency"  # DETECTORS key
    # The flow-control runs' ordering within a flow: epp's least-prefill (cheapest first), or a
    # reference one (fcfs-ordering-policy, edf-ordering-policy).
    ordering: str = "least-prefill-ordering-policy"
    workload: str = "bursty"  # of the overload and priority scenarios
    params: WorkloadParams = field(default_factory=WorkloadParams)


def tag(trace: Trace, headers: dict[str, str], share: float, seed: int, label: str) -> list[bool]:
    """Give ``headers`` to about ``share`` of the sessions (seeded), and ``/label`` to their
    kind (so their requests can be told apart in the results); which ones got them."""
    rng = random.Random(seed)
    picked = []
    for s in trace.sessions:
        hit = rng.random() < share
        if hit:
            s.headers = {**s.headers, **headers}
            s.kind = f"{s.kind}/{label}"
        picked.append(hit)
    return picked


def labelled(label: str) -> Any:
    return lambda r: r.kind.endswith(f"/{label}")


def merge(a: Trace, b: Trace) -> Trace:
    out = Trace(f"{a.workload}+{b.workload}", a.seed, a.rate + b.rate, sorted(a.sessions + b.sessions,
                                                                               key=lambda s: s.start_s))
    return out


def slo_stats(results: list[RequestResult], elapsed: float, slo_ttft: float, slo_tpot: float) -> dict[str, Any]:
    """Goodput and what happened to the requests that were not served."""
    met = 0
    for r in results:
        if r.status != 200 or r.ttft_s is None or r.e2e_s is None:
            continue
        tpot = (r.e2e_s - r.ttft_s) / max(1, r.output_tokens - 1)
        if r.ttft_s <= slo_ttft and tpot <= slo_tpot:
            met += 1
    refused: dict[str, int] = {}
    for r in results:
        if r.status not in (200, 599):
            key = f"{r.status} {r.dropped or '-'}"
            refused[key] = refused.get(key, 0) + 1
    return {"goodput_rps": round(met / elapsed, 2) if elapsed else 0.0, "slo_met": met,
            "slo_met_share": round(met / len(results), 3) if results else 0.0,
            "refused": refused, "timed_out": sum(1 for r in results if r.status == 599)}


def _p90(results: list[RequestResult], predicate: Any = None) -> float:
    xs = [r.ttft_s for r in results if r.status == 200 and r.ttft_s is not None and (predicate is None or predicate(r))]
    return round(_pct(xs, 90), 4)


async def start_epp_contender(addresses: list[str], workdir: Path, config: str | None,
                              objectives: str | None = None, endpoints_file: Path | None = None) -> Running:
    extra: list[str] = []
    for flag, text, name in (("--config-file", config, "epp-config.yaml"),
                             ("--objectives-file", objectives, "objectives.yaml")):
        if text is not None:
            (workdir / name).write_text(text)
            extra += [flag, str(workdir / name)]
    return await epp_behind_envoy(addresses, workdir, tuple(extra), endpoints_file=endpoints_file)


class Bench:
    def __init__(self, out: Path, opts: OverloadOptions, router_cores: set[int] | None, cap: float) -> None:
        self.out = out
        self.opts = opts
        self.router_cores = router_cores
        self.cap = cap
        self.rows: list[dict[str, Any]] = []
        self.unavailable: dict[str, str] = {}

    async def run(self, scenario: str, contender: str, trace: Trace, config: str | None = None,
                  objectives: str | None = None, endpoints_later: float | None = None
                  ) -> tuple[list[RequestResult], float]:
        """``trace`` through ``contender`` ("epp" with ``config``, or a peer) in front of a fresh
        fleet; with ``endpoints_later`` epp starts with none and gets them that many seconds in."""
        o = self.opts
        print(f"epp bench overload: {scenario} / {contender} ...", file=sys.stderr, flush=True)
        fleet = Fleet(free_ports(o.servers), profile(o.preset))
        await fleet.start()
        work = self.out / "logs" / f"{scenario}-{contender}"
        work.mkdir(parents=True, exist_ok=True)
        addresses = [s.address for s in fleet.servers]
        try:
            running: Running | str
            ep_file = None
            if contender.startswith("epp"):
                if endpoints_later is not None:
                    ep_file = work / "endpoints.yaml"
                    ep_file.write_text("[]\n")
                running = await start_epp_contender(addresses, work, config, objectives, ep_file)
            else:
                running = await start_contender(contender, addresses, work, Path(".venv-peers").resolve())
            if isinstance(running, str):
                self.unavailable[contender] = running
                print(f"  not available: {running}", file=sys.stderr)
                return [], 0.0
            try:
                running.isolate(self.router_cores)
                cpu0 = running.cpu()
                adder = None
                if ep_file is not None and endpoints_later is not None:
                    adder = asyncio.create_task(_write_later(ep_file, addresses, endpoints_later))
                results, elapsed, _ = await drive(running.url, trace, fleet, o.max_seconds)
                if adder is not None:
                    await adder
                row = summarize(contender, round(trace.rate / self.cap, 2), results, elapsed, fleet,
                                running.cpu() - cpu0)
                row.pop("ttft_all_s", None)
                row.update(scenario=scenario, **slo_stats(results, elapsed, o.slo_ttft_s, o.slo_tpot_s))
                self.rows.append(row)
                (work / "requests.json").write_text(json.dumps([r.__dict__ for r in results]))
                print(f"  goodput {row['goodput_rps']} req/s, TTFT p90 {row['ttft_p90_s']} s, refused "
                      f"{row['refused']}, timed out {row['timed_out']}", file=sys.stderr, flush=True)
                return results, elapsed
            finally:
                running.stop()
        finally:
            await fleet.stop()


async def _write_later(path: Path, addresses: list[str], delay: float) -> None:
    await asyncio.sleep(delay)
    path.write_text("".join(f"- {a}\n" for a in addresses))


async def bench_overload(out: Path, opts: OverloadOptions) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    own = os.sched_getaffinity(0)
    fleet_cores, router_cores = split_cores()
    _place(os.getpid(), fleet_cores)
    try:
        return await _bench(out, opts, router_cores)
    finally:
        _place(os.getpid(), own)


async def _bench(out: Path, o: OverloadOptions, router_cores: set[int] | None) -> dict[str, Any]:
    result: dict[str, Any] = {"meta": {"date": time.strftime("%Y-%m-%d %H:%M"), "preset": o.preset,
                                       "servers": o.servers, "requests": o.requests, "ttl": o.ttl,
                                       "slo_ttft_s": o.slo_ttft_s, "slo_tpot_s": o.slo_tpot_s,
                                       "detector": o.detector, "workload": o.workload}}
    checks: dict[str, Any] = {}
    if "queue" in o.scenarios:
        result["queue"] = queue_cost()
        checks["queue_us_at_100k_max"] = max(r["us_per_request"] for r in result["queue"] if r["queued"] == 100_000)
    fleet_scenarios = [s for s in o.scenarios if s != "queue"]
    cap = 0.0
    if fleet_scenarios:
        cap = o.capacity_rps or await capacity(o.preset, o.servers, "mix", o.params, o.capacity_seconds)
    result["meta"]["capacity_rps"] = round(cap, 2)
    print(f"epp bench overload: capacity {cap:.1f} req/s", file=sys.stderr, flush=True)
    b = Bench(out, o, router_cores, cap)
    on = flow_config(o.ttl, detector=o.detector, ordering=o.ordering)
    if "overload" in o.scenarios:
        trace = build(o.workload, o.requests, cap * 1.6, o.seed, o.params)
        off_r, _ = await b.run("overload", "epp", trace)
        on_r, _ = await b.run("overload", "epp-flow-control", trace, on)
        if o.peers:
            for peer in PEERS:
                await b.run("overload", peer, trace)
        rows = {r["contender"]: r for r in b.rows if r["scenario"] == "overload"}
        off_g, on_g = rows["epp"]["goodput_rps"], rows["epp-flow-control"]["goodput_rps"]
        checks["overload_goodput_ratio"] = round(on_g / off_g, 2) if off_g else None
        checks["overload_served_ttft_p90_s"] = _p90(on_r)
        checks["overload_timed_out"] = rows["epp-flow-control"]["timed_out"]
        checks["overload_off_ttft_p90_s"] = _p90(off_r)
    if "priority" in o.scenarios:
        trace = build(o.workload, o.requests, cap * 1.4, o.seed + 1, o.params)
        critical = tag(trace, {"x-llm-d-inference-objective": "critical"}, 0.25, o.seed, "critical")
        alone = replace(trace, sessions=[s for s, c in zip(trace.sessions, critical, strict=True) if c])
        off_r, _ = await b.run("priority", "epp", trace, None, CRITICAL_OBJECTIVE)
        # The reference's tool for this: priority-holdback keeps standard traffic under 0.6 of the
        # set point, so a critical request finds room at once.
        held = flow_config(o.ttl, detector=o.detector, ordering=o.ordering, holdback=0.6)
        on_r, _ = await b.run("priority", "epp-flow-control", trace, held, CRITICAL_OBJECTIVE)
        idle_r, _ = await b.run("priority", "epp-critical-alone", alone, None, CRITICAL_OBJECTIVE)
        off_p90 = _p90(off_r, labelled("critical"))
        on_p90 = _p90(on_r, labelled("critical"))
        idle_p90 = _p90(idle_r)
        checks.update(priority_critical_p90_off_s=off_p90, priority_critical_p90_on_s=on_p90,
                      priority_critical_p90_idle_s=idle_p90,
                      priority_on_vs_off=round(on_p90 / off_p90, 3) if off_p90 else None,
                      priority_on_vs_idle=round(on_p90 / idle_p90, 3) if idle_p90 else None)
    if "fairness" in o.scenarios:
        a = build("zipf", int(o.requests * 0.75), cap * 0.9, o.seed + 2, o.params)
        tag(a, {"x-llm-d-inference-fairness-id": "tenant-a"}, 1.0, 0, "tenant-a")
        bt = build("zipf", int(o.requests * 0.25), cap * 0.3, o.seed + 3, o.params)
        tag(bt, {"x-llm-d-inference-fairness-id": "tenant-b"}, 1.0, 0, "tenant-b")
        both = merge(a, bt)
        rr = flow_config(o.ttl, "round-robin-fairness-policy", detector=o.detector, ordering=o.ordering)
        off_r, _ = await b.run("fairness", "epp", both)
        on_r, elapsed_on = await b.run("fairness", "epp-flow-control", both, rr)
        alone_r, _ = await b.run("fairness", "epp-flow-control-b-alone", bt, rr)
        b_on = _p90(on_r, labelled("tenant-b"))
        b_off = _p90(off_r, labelled("tenant-b"))
        b_alone = _p90(alone_r)
        elapsed_on = elapsed_on or 1.0
        a_tok = sum(r.output_tokens for r in on_r if r.status == 200 and labelled("tenant-a")(r)) / elapsed_on
        b_tok = sum(r.output_tokens for r in on_r if r.status == 200 and labelled("tenant-b")(r)) / elapsed_on
        cap_tok = cap * o.params.output_tokens
        checks.update(fairness_b_p90_on_s=b_on, fairness_b_p90_off_s=b_off, fairness_b_p90_alone_s=b_alone,
                      fairness_b_on_vs_alone=round(b_on / b_alone, 3) if b_alone else None,
                      fairness_a_tok_s=round(a_tok, 1), fairness_b_tok_s=round(b_tok, 1),
                      fairness_capacity_tok_s=round(cap_tok, 1),
                      fairness_a_share_of_rest=round(a_tok / (cap_tok - b_tok), 3) if cap_tok > b_tok else None)
    if "eviction" in o.scenarios:
        # In-flight eviction: 25% critical, the rest sheddable (priority -1), at 1.4x; flow control
        # without holdback, so critical work finds the pods full of dispatched sheddable work.
        trace = build(o.workload, o.requests, cap * 1.4, o.seed + 5, o.params)
        critical = tag(trace, {"x-llm-d-inference-objective": "critical"}, 0.25, o.seed, "critical")
        rest = replace(trace, sessions=[s for s, c in zip(trace.sessions, critical, strict=True) if not c])
        tag(rest, {"x-llm-d-inference-objective": "batch"}, 1.0, 0, "batch")  # (the same session objects)
        kept = flow_config(o.ttl, detector=o.detector, ordering=o.ordering)
        evicting = flow_config(o.ttl, detector=o.detector, ordering=o.ordering,
                               evict="priority-then-time-eviction-order-policy")
        progress = flow_config(o.ttl, detector=o.detector, ordering=o.ordering,
                               evict="priority-then-progress-eviction-order-policy")
        kept_r, _ = await b.run("eviction", "epp-flow-control", trace, kept, SHEDDABLE_OBJECTIVE)
        evict_r, _ = await b.run("eviction", "epp-flow-control-eviction", trace, evicting, SHEDDABLE_OBJECTIVE)
        progress_r, _ = await b.run("eviction", "epp-flow-control-eviction-progress", trace, progress,
                                    SHEDDABLE_OBJECTIVE)
        crit, batch = labelled("critical"), labelled("batch")

        def served(rs: list[RequestResult], who: Any) -> int:
            return sum(1 for r in rs if r.status == 200 and who(r))

        checks.update(eviction_critical_sent=sum(1 for r in kept_r if crit(r)),
                      eviction_batch_sent=sum(1 for r in kept_r if batch(r)),
                      eviction_critical_p90_kept_s=_p90(kept_r, crit),
                      eviction_critical_p90_on_s=_p90(evict_r, crit),
                      eviction_critical_served_kept=served(kept_r, crit),
                      eviction_critical_served_on=served(evict_r, crit),
                      eviction_batch_served_kept=served(kept_r, batch),
                      eviction_batch_served_on=served(evict_r, batch),
                      eviction_evicted=sum(1 for r in evict_r if r.dropped == "evicted"),
                      eviction_cut_streams=sum(1 for r in evict_r if r.status == 599 and batch(r)),
                      eviction_progress_critical_p90_s=_p90(progress_r, crit),
                      eviction_progress_critical_served=served(progress_r, crit),
                      eviction_progress_batch_served=served(progress_r, batch),
                      eviction_progress_evicted=sum(1 for r in progress_r if r.dropped == "evicted"),
                      eviction_progress_cut_streams=sum(1 for r in progress_r if r.status == 599 and batch(r)))
    if "scale-from-zero" in o.scenarios:
        rate = max(1.0, cap * 0.3)
        trace = build("zipf", int(rate * 12), rate, o.seed + 4, o.params)
        # The waiting room with the default queue budget (60 s): the backlog drains once pods appear.
        zero = flow_config("60s", detector=o.detector, ordering=o.ordering)
        zero_on, _ = await b.run("scale-from-zero", "epp-flow-control", trace, zero, endpoints_later=5.0)
        zero_off, _ = await b.run("scale-from-zero", "epp", trace, None, endpoints_later=5.0)
        early = [r for r in zero_on if r.sent_s < 5.0]
        checks.update(zero_sent_before_endpoints=len(early),
                      zero_served_before_endpoints=sum(1 for r in early if r.status == 200),
                      zero_off_served_before_endpoints=sum(1 for r in zero_off if r.sent_s < 5.0 and r.status == 200))
    result["checks"] = checks
    result["rows"] = b.rows
    result["unavailable"] = b.unavailable
    (out / "overload.json").write_text(json.dumps(result, indent=1))
    (out / "overload.md").write_text(markdown(result))
    plots(out, result)
    return result


def queue_cost() -> list[dict[str, Any]]:
    """Microseconds per enqueue + dispatch pair with ``queued`` requests already waiting."""
    from epp.datastore.endpoint import EndpointState, EngineSignals
    from epp.datastore.store import Snapshot
    from epp.flowcontrol.contract import QueuedRequest
    from epp.flowcontrol.controller import BandSpec, FlowController, FlowSettings
    from epp.flowcontrol.detectors import UtilizationDetector
    from epp.flowcontrol.policies import FCFSOrdering, GlobalStrictFairness, RoundRobinFairness, StaticUsageLimit
    from epp.scheduling.params import Params

    def p(cls: Any) -> Any:
        return cls(cls.type_name, Params({}, cls.type_name))

    now = time.monotonic()
    idle = tuple(EndpointState(f"10.0.0.{i}:8000", EngineSignals(), scraped_at=now + 3600) for i in range(8))
    open_pool = Snapshot(idle, {}, {}, now, 2.0)
    rows = []
    for fairness in (GlobalStrictFairness, RoundRobinFairness):
        for flows in (1, 100):
            for queued in (0, 1000, 100_000):
                fc = FlowController(FlowSettings(p(UtilizationDetector), p(StaticUsageLimit), p(fairness),
                                                 p(FCFSOrdering), default_band=BandSpec(max_requests=200_000)))
                for i in range(queued):
                    fc.enqueue(QueuedRequest(f"f{i % flows}", 0, 1000, now), now)
                n = 20_000
                gc.collect()  # the previous configurations' garbage is not this one's cost
                t0 = time.perf_counter()
                for i in range(n):
                    fc.enqueue(QueuedRequest(f"f{i % flows}", 0, 1000, now), now)
                    fc.next(open_pool)
                us = (time.perf_counter() - t0) / n * 1e6
                rows.append({"fairness": fairness.type_name, "flows": flows, "queued": queued,
                             "us_per_request": round(us, 2)})
    return rows


def markdown(result: dict[str, Any]) -> str:
    m = result["meta"]
    lines = [f"# epp bench overload ({m['date']}): {m['preset']}, {m['servers']} servers, capacity "
             f"{m.get('capacity_rps')} req/s, queue budget {m['ttl']}, SLO TTFT <= {m['slo_ttft_s']} s and TPOT <= "
             f"{m['slo_tpot_s'] * 1000:g} ms", ""]
    if result.get("rows"):
        lines += ["| scenario | contender | load | requests | goodput req/s | SLO met | TTFT p50 s | TTFT p90 s "
                  "| TTFT p99 s | refused | timed out | output tok/s | router CPU us/req |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in result["rows"]:
            refused = ", ".join(f"{k}: {v}" for k, v in sorted(r["refused"].items())) or "-"
            lines.append(f"| {r['scenario']} | {r['contender']} | {r['load']} | {r['requests']} | {r['goodput_rps']} "
                         f"| {r['slo_met_share']} | {r['ttft_p50_s']} | {r['ttft_p90_s']} | {r['ttft_p99_s']} "
                         f"| {refused} | {r['timed_out']} | {r['output_tok_per_s']} | {r['router_cpu_us_per_req']} |")
    if result.get("queue"):
        lines += ["", "Enqueue + dispatch, in process (us per request):", "",
                  "| fairness | flows | queued | us/request |", "|---|---|---|---|"]
        lines += [f"| {q['fairness']} | {q['flows']} | {q['queued']} | {q['us_per_request']} |"
                  for q in result["queue"]]
    if result.get("checks"):
        lines += ["", "Checks:", ""] + [f"- {k}: {v}" for k, v in result["checks"].items()]
    for name, why in result.get("unavailable", {}).items():
        lines.append(f"\n{name}: not available ({why})")
    return "\n".join(lines) + "\n"


def plots(out: Path, result: dict[str, Any]) -> None:
    """overload.png: per scenario, the TTFT CDF of each contender's served requests (the SLO
    marked), with its goodput in the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenarios = list(dict.fromkeys(r["scenario"] for r in result.get("rows", [])))
    if not scenarios:
        return
    fig, axes = plt.subplots(1, len(scenarios), figsize=(5.2 * len(scenarios), 4.0), squeeze=False)
    for ax, scenario in zip(axes[0], scenarios, strict=True):
        for r in result["rows"]:
            if r["scenario"] != scenario:
                continue
            path = out / "logs" / f"{scenario}-{r['contender']}" / "requests.json"
            if not path.exists():
                continue
            ttft = sorted(x["ttft_s"] for x in json.loads(path.read_text())
                          if x["status"] == 200 and x["ttft_s"] is not None)
            if ttft:
                ax.plot(ttft, [(i + 1) / len(ttft) for i in range(len(ttft))],
                        label=f"{r['contender']} (goodput {r['goodput_rps']}/s, {sum(r['refused'].values())} refused)")
        ax.axvline(result["meta"]["slo_ttft_s"], color="grey", linestyle=":", linewidth=1)
        ax.set_xscale("log")
        ax.set_xlabel("TTFT of served requests (s)")
        ax.set_title(scenario)
        ax.legend(fontsize=7, loc="lower right")
    axes[0, 0].set_ylabel("fraction of served requests")
    fig.tight_layout()
    fig.savefig(out / "overload.png", dpi=100)
    plt.close(fig)
