"""What a scheduling profile costs per pick, in process: the default profile alone and with
predicted-latency scoring added, side by side, for pools of several sizes.

Each pick runs the whole request life the plugins see: the pick path (schedule, commit) and the
response path (first bytes, the end with its usage, where the latency model learns), timed
apart. CPU time per request (``time.process_time``), the median of a few rounds; the difference
between the two profiles is what predicted-latency scoring adds to each path.
"""

from __future__ import annotations

import gc
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from epp.config import parse_config
from epp.datastore.endpoint import EngineSignals
from epp.datastore.store import Datastore, Snapshot
from epp.request import InferenceRequest
from epp.scheduling.contract import ReadsClock, declares
from epp.scheduling.types import Completion, Usage

_PROFILE = """
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: queue-scorer
- type: kv-cache-utilization-scorer
- type: prefix-cache-scorer
{extra_plugins}- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
{extra_refs}  - {{pluginRef: queue-scorer, weight: 2}}
  - {{pluginRef: kv-cache-utilization-scorer, weight: 2}}
  - {{pluginRef: prefix-cache-scorer, weight: 3}}
  - {{pluginRef: max-score-picker}}
"""
PROFILES = {
    "default": _PROFILE.format(extra_plugins="", extra_refs=""),
    "default + predicted latency": _PROFILE.format(
        extra_plugins="- type: predicted-latency-producer\n  parameters: {streamingMode: true}\n"
                      "- type: latency-scorer\n",
        extra_refs="  - {pluginRef: predicted-latency-producer}\n  - {pluginRef: latency-scorer, weight: 1}\n"),
    "recommended (predicted latency alone)": (Path(__file__).resolve().parents[1] / "profiles"
                                              / "recommended.yaml").read_text(),
}


@dataclass
class CostRow:
    profile: str
    candidates: int
    picks: int
    pick_us: float  # schedule + commit
    response_us: float  # first bytes + end (learning)
    added_pick_us: float | None = None
    added_response_us: float | None = None


def _pool(n: int, now: float, shift: int = 0) -> Snapshot:
    """``n`` endpoints with varied signals and epp's requests in flight on them, taken from a
    datastore as the pick path takes it; ``shift`` rotates the load over them (each pick of a run
    sees another rotation, so every endpoint gets picks, as on a live pool)."""
    store = Datastore(staleness=2.0, clock=lambda: now)
    addresses = [f"10.0.{i // 250}.{i % 250}:8000" for i in range(n)]
    store.set_endpoints(addresses)
    for i, a in enumerate(addresses):
        for k in range((i + shift) % 4):
            store.acquire(a, 200 * ((i + shift) % 3) if k == 0 else 0)
        store.record_scrape(a, EngineSignals(waiting=float((i + shift) % 3), running=float(4 + (i + shift) % 7),
                                             kv_usage=0.1 + ((i + shift) % 5) / 10, block_size=16,
                                             num_gpu_blocks=28000), store.total_picks[a])
    return store.snapshot()


def _requests(n: int) -> list[InferenceRequest]:
    system = "You are a helpful assistant for the billing team. " * 40
    return [InferenceRequest(f"r{i}", "/v1/chat/completions", model="m",
                             prompt=f"{system if i % 2 else ''}question {i} about invoices " * 3,
                             body={"stream": True, "max_tokens": 64}) for i in range(n)]


class _Clock:
    """The latency producer's clock in this loop: each response takes a plausible time (so its
    model keeps learning and its predictions stay in use, as on a live pool)."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        self.t += 0.02
        return self.t


def _per_pick(scheduler: Any, pools: list[Snapshot], requests: list[InferenceRequest]) -> tuple[float, float]:
    """(pick path, response path) CPU us per request."""
    for p in scheduler.profile.producers:
        if declares(p, ReadsClock):
            p.use_clock(_Clock())
    gc.collect()
    clock = time.process_time
    picking = responding = 0.0
    for i, r in enumerate(requests):
        pool = pools[i % len(pools)]
        t0 = clock()
        d = scheduler.schedule(r, pool)
        scheduler.committed(d)
        t1 = clock()
        scheduler.prefill_done(d)
        scheduler.completed(d, Completion(Usage(len(r.prompt) // 4, 0, 64), True))
        picking += t1 - t0
        responding += clock() - t1
    return picking / len(requests) * 1e6, responding / len(requests) * 1e6


def scheduling_cost(sizes: tuple[int, ...] = (8, 32, 128, 1000), picks: int = 2000, rounds: int = 5
                    ) -> list[CostRow]:
    rows: list[CostRow] = []
    for n in sizes:
        now = time.monotonic()
        pool = [_pool(n, now, shift) for shift in range(7)]
        count = max(200, picks * 8 // n)
        requests = _requests(count)
        schedulers = {name: parse_config(text).build()[0] for name, text in PROFILES.items()}
        for scheduler in schedulers.values():
            _per_pick(scheduler, pool, requests[: count // 4])  # warm the prefix index and the model
        # Rounds interleaved over the profiles, so that a machine slowing down for a while weighs on
        # each profile alike (the differences are what this measures).
        runs: dict[str, list[tuple[float, float]]] = {name: [] for name in schedulers}
        for _ in range(rounds):
            for name, scheduler in schedulers.items():
                runs[name].append(_per_pick(scheduler, pool, requests))
        by_profile = {name: (statistics.median(r[0] for r in rs), statistics.median(r[1] for r in rs))
                      for name, rs in runs.items()}
        base = by_profile["default"]
        for name, (pick, response) in by_profile.items():
            own = name == "default"
            rows.append(CostRow(name, n, count, round(pick, 1), round(response, 1),
                                None if own else round(pick - base[0], 1),
                                None if own else round(response - base[1], 1)))
    return rows


def markdown(rows: list[CostRow]) -> str:
    lines = ["| profile | candidates | picks | pick path CPU us | added | response path CPU us | added |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        def added(v: float | None) -> str:
            return "-" if v is None else f"{v:+.1f}"
        lines.append(f"| {r.profile} | {r.candidates} | {r.picks} | {r.pick_us:.1f} | {added(r.added_pick_us)} "
                     f"| {r.response_us:.1f} | {added(r.added_response_us)} |")
    return "\n".join(lines) + "\n"
