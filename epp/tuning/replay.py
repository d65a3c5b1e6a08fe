"""Replay a recorded trace against simulated engines on a virtual clock, routed by one config.

The routing is epp's own: the director, its scheduler built from the config, the datastore, flow
control and the plugins' state (the approximate prefix index, the latency model), in this
process. The pods are the simulator's engines (continuous batching over a prefix-cached KV
cache), one per endpoint of the recorded pool, configured from the pool's cache config and the
speed the trace shows. There is no network: the datastore is fed the engines' queue and KV
numbers every ``refresh_s`` as a scrape would, and each response goes back through the routed
request's response side (first bytes, the body with its usage, the end) as ext_proc would.

Everything runs on a virtual clock (epp.sim.virtualtime), so a replay takes its Python time, not
the trace's, and the machine's load does not change its answer.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import orjson

from epp.config import PickerConfig, build, parse_config
from epp.datastore.endpoint import EngineSignals
from epp.datastore.store import Datastore
from epp.observability.flowmetrics import FlowMetrics
from epp.observability.metrics import PickerMetrics
from epp.requestcontrol.admission import SheddableAdmission
from epp.requestcontrol.director import Director
from epp.requestcontrol.headers import FAIRNESS_ID, OBJECTIVE
from epp.requestcontrol.pending import Pending
from epp.requestcontrol.policies import RequestPolicies
from epp.requestcontrol.refused import Refused
from epp.requestcontrol.routed import RequestInput, ResponseAccess, Routed
from epp.scheduling.contract import DrawsRandomly, ReadsClock, declares
from epp.scheduling.latency import PredictedLatencyProducer
from epp.sim.engine import Engine
from epp.sim.profiles import EngineParams
from epp.sim.tokenizer import SimTokenizer
from epp.sim.virtualtime import VirtualClockLoop
from epp.tuning.trace import PromptMaker, RecordedTrace

# Plugin types a replay cannot give what they need, and why.
UNSUPPORTED: dict[str, str] = {
    "precise-prefix-cache-scorer": "it reads the pods' KV events, which a replay does not publish",
    "token-producer": "it fetches token ids from the model servers",
    "disagg-profile-handler": "a replay runs one aggregated pool (no prefill/decode roles)",
    "data-parallel-profile-handler": "a replay runs one engine per endpoint",
}


class ReplayError(ValueError):
    """The config cannot be replayed (the message says which plugin and why)."""


@dataclass(slots=True)
class ReplayOptions:
    refresh_s: float = 0.05  # how often the datastore is fed the engines' numbers (a scrape)
    staleness_s: float = 2.0
    seed: int = 1
    path_s: float = 0.0  # a live gateway's path: half on the way to the pod, half on the first token's way back


@dataclass(slots=True)
class ReplayResult:
    config: str
    ttft_s: list[float] = field(default_factory=list)  # arrival (as the trace has it) -> first token
    e2e_s: list[float] = field(default_factory=list)
    queued_s: list[float] = field(default_factory=list)  # held by flow control
    ttft_by_priority: dict[int, list[float]] = field(default_factory=dict)
    refused: Counter[int] = field(default_factory=Counter)  # HTTP status -> requests
    failed: int = 0  # an engine could not serve the request (a prompt that never fits)
    per_endpoint: list[int] = field(default_factory=list)
    prefix_hits: int = 0
    prefix_queries: int = 0
    virtual_s: float = 0.0
    wall_s: float = 0.0
    latency_error_p50: float | None = None  # the latency model's median TTFT error, when the config has one

    def summary(self) -> dict[str, Any]:
        served = self.per_endpoint
        mean = sum(served) / len(served) if served else 0.0
        return {"config": self.config, "requests": len(self.ttft_s) + self.failed + sum(self.refused.values()),
                "ttft_p50_s": _pct(self.ttft_s, 50), "ttft_p90_s": _pct(self.ttft_s, 90),
                "ttft_p99_s": _pct(self.ttft_s, 99),
                "ttft_mean_s": round(statistics.fmean(self.ttft_s), 4) if self.ttft_s else None,
                "e2e_p90_s": _pct(self.e2e_s, 90),
                "prefix_hit_rate": round(self.prefix_hits / self.prefix_queries, 3) if self.prefix_queries else 0.0,
                "load_imbalance": round(max(served) / mean, 2) if mean else 0.0, "per_endpoint": served,
                "refused": dict(self.refused), "failed": self.failed,
                "queued_p90_s": _pct(self.queued_s, 90) if self.queued_s else 0.0,
                "ttft_p90_by_priority_s": {p: _pct(xs, 90) for p, xs in sorted(self.ttft_by_priority.items())},
                "latency_error_p50": self.latency_error_p50,
                "virtual_s": round(self.virtual_s, 2), "wall_s": round(self.wall_s, 2)}


def _pct(xs: list[float], p: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    return round(s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))], 4)


def objective_name(priority: int) -> str:
    """The InferenceObjective a replay gives requests of ``priority`` (the trace has the number)."""
    return f"priority-{priority}"


def check_replayable(cfg: PickerConfig) -> None:
    """Raise ReplayError for a plugin a replay cannot run."""
    for ref, spec in cfg.plugins.items():
        why = UNSUPPORTED.get(spec.type.type_name)
        if why is not None:
            raise ReplayError(f"{spec.path}: {spec.type.type_name} ({ref}) cannot be replayed: {why}")


@dataclass(frozen=True, slots=True)
class Workload:
    """A trace made ready to replay: per request its arrival, body, prompt ids and output length."""

    arrivals: tuple[float, ...]
    headers: tuple[dict[str, str], ...]  # the objective (priority) and fairness id each was recorded with
    priorities: tuple[int, ...]
    bodies: tuple[bytes, ...]
    prompt_ids: tuple[list[int], ...]
    output_tokens: tuple[int, ...]
    streams: tuple[bool, ...]
    models: tuple[str, ...]

    @classmethod
    def from_trace(cls, trace: RecordedTrace) -> Workload:
        maker = PromptMaker(trace.tokens_per_block())
        tok = SimTokenizer()
        bodies, ids, outs, headers = [], [], [], []
        for i, r in enumerate(trace.requests):
            h = {"content-type": "application/json", "x-request-id": f"replay-{i}"}
            if r.priority:
                h[OBJECTIVE] = objective_name(r.priority)
            if r.flow:
                h[FAIRNESS_ID] = r.flow
            headers.append(h)
            text = maker.prompt(r, i)
            out = r.completion_tokens or r.max_tokens or 16
            body: dict[str, Any] = {"model": r.model, "prompt": text, "max_tokens": out, "stream": r.stream}
            if r.stream:
                body["stream_options"] = {"include_usage": True}
            bodies.append(orjson.dumps(body))
            ids.append(tok.encode(text))
            outs.append(max(1, out))
        return cls(tuple(r.t for r in trace.requests), tuple(headers), tuple(r.priority for r in trace.requests),
                   tuple(bodies), tuple(ids), tuple(outs),
                   tuple(r.stream for r in trace.requests), tuple(sorted({r.model for r in trace.requests})))


def run_replay(config_text: str, name: str, work: Workload, engines: list[EngineParams],
               opts: ReplayOptions | None = None, addresses: list[str] | None = None) -> ReplayResult:
    """Replay ``work`` routed by ``config_text`` on a fresh virtual clock (blocking)."""
    result: ReplayResult = VirtualClockLoop().run(replay(config_text, name, work, engines, opts or ReplayOptions(),
                                                         addresses))
    return result


async def replay(config_text: str, name: str, work: Workload, engines: list[EngineParams], opts: ReplayOptions,
                 addresses: list[str] | None = None) -> ReplayResult:
    loop = asyncio.get_running_loop()
    clock = loop.time
    wall0 = time.perf_counter()
    cfg = parse_config(config_text, name)
    check_replayable(cfg)
    built = build(cfg)
    for k, plugin in enumerate(built.instances.values()):  # (the same draws for every config replayed)
        if declares(plugin, ReadsClock):
            plugin.use_clock(clock)
        if declares(plugin, DrawsRandomly):
            plugin.reseed(opts.seed * 1000 + k)
    rt = built.runtime()
    store = Datastore(staleness=opts.staleness_s, clock=clock)
    metrics = PickerMetrics(store)
    director = Director(store, built.scheduler, metrics, admission=SheddableAdmission(rt.detector),
                        rng=random.Random(opts.seed), clock=clock)
    director.admitters, director.preparers = rt.admitters, rt.preparers
    director.policies = RequestPolicies(objectives={objective_name(p): p for p in set(work.priorities) if p})
    director.set_flow_control(rt.flow, FlowMetrics(metrics.registry, "default"))
    addrs = addresses or [f"10.0.0.{i + 1}:8000" for i in range(len(engines))]
    fleet = {a: Engine(p, seed=i, clock=clock) for i, (a, p) in enumerate(zip(addrs, engines, strict=True))}
    store.set_endpoints(addrs)
    for e in fleet.values():
        e.start()
    result = ReplayResult(name)

    def scrape() -> None:
        for a, e in fleet.items():
            store.record_scrape(a, EngineSignals(
                float(len(e.waiting)), float(len(e.running)), e.kv.usage(), e.params.block_size,
                e.params.num_gpu_blocks, work.models), store.total_picks.get(a, 0))

    async def scraping() -> None:
        while True:
            scrape()
            await asyncio.sleep(opts.refresh_s)

    async def one(i: int) -> None:
        arrived = clock()
        given = RequestInput(work.headers[i], "/v1/completions", work.bodies[i])
        decided: asyncio.Future[Routed | Refused] = loop.create_future()

        def ready(outcome: Routed | Refused) -> None:
            if not decided.done():
                decided.set_result(outcome)

        try:
            out = director.submit(given, ResponseAccess.READ, ready)
        except Refused as e:
            result.refused[e.status] += 1
            return
        if isinstance(out, Pending):
            if out.result is not None and not decided.done():
                decided.set_result(out.result)
            got = await decided
            if isinstance(got, Refused):
                result.refused[got.status] += 1
                return
            out = got
        await _serve(out, fleet[out.decision.primary], i, arrived, work, result, clock, opts.path_s / 2)

    scrape()
    feeder = loop.create_task(scraping())
    tasks = []
    for i, at in enumerate(work.arrivals):
        delay = at - clock()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(loop.create_task(one(i)))
    await asyncio.gather(*tasks)
    result.virtual_s = clock()
    feeder.cancel()
    for p in director.preparers:
        await p.close()
    for e in fleet.values():
        await e.stop()
    result.per_endpoint = [sum(e.stats.finished.values()) for e in fleet.values()]
    result.prefix_hits = sum(e.stats.prefix_hits for e in fleet.values())
    result.prefix_queries = sum(e.stats.prefix_queries for e in fleet.values())
    result.wall_s = time.perf_counter() - wall0
    models = [p.errors.overall_median() for p in built.instances.values() if isinstance(p, PredictedLatencyProducer)]
    result.latency_error_p50 = models[0] if models else None
    return result


async def _serve(routed: Routed, engine: Engine, i: int, arrived: float, work: Workload, result: ReplayResult,
                 clock: Any, half_path: float = 0.0) -> None:
    """The engine serves the request; its response goes back through ``routed`` as the wire would
    (``half_path`` seconds each way: to the pod, and the first token's way back)."""
    routed.status = 200
    result.queued_s.append(routed.queued)
    ids = work.prompt_ids[i]
    if half_path:
        await asyncio.sleep(half_path)
    sim = engine.submit(ids, work.output_tokens[i], ignore_eos=True)
    first = await sim.queue.get()
    if half_path:
        await asyncio.sleep(half_path)
    if first is None:
        result.failed += 1
        routed.status = 500
        routed.finish()
        return
    result.ttft_s.append(clock() - arrived)
    result.ttft_by_priority.setdefault(work.priorities[i], []).append(result.ttft_s[-1])
    stream = work.streams[i]
    if stream:
        routed.response_body(b'data: {"choices":[{"index":0,"text":"x"}]}\n\n', False)
    while await sim.queue.get() is not None:
        pass
    usage = (b'{"prompt_tokens":%d,"completion_tokens":%d,"prompt_tokens_details":{"cached_tokens":%d}}'
             % (len(ids), len(sim.output_ids), max(0, sim.cached_tokens)))
    if stream:
        routed.response_body(b'data: {"choices":[],"usage":' + usage + b'}\n\ndata: [DONE]\n\n', True)
    else:
        routed.response_body(b'{"choices":[{"index":0,"text":"x"}],"usage":' + usage + b"}", True)
    result.e2e_s.append(clock() - arrived)
