"""burst-prefix-cache-producer: the joint placement of a window (pure), the window itself (the
director waits for it), and the reference's parameters."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import orjson
import pytest

from epp.config import parse_config
from epp.datastore.endpoint import EngineSignals
from epp.datastore.store import Datastore
from epp.observability.metrics import PickerMetrics
from epp.requestcontrol.director import Director
from epp.requestcontrol.routed import RequestInput, Routed
from epp.scheduling.burst import BurstPrefixProducer, Entry, Replica, assign
from epp.scheduling.params import Params
from epp.scheduling.types import ConfigError

R = [Replica(f"10.0.0.{i}:8000", 0) for i in range(4)]


def entries(*groups: tuple[tuple[int, ...], int]) -> list[Entry]:
    out = []
    for hashes, n in groups:
        out += [Entry(list(hashes)) for _ in range(n)]
    return out


def where(es: list[Entry]) -> list[str | None]:
    return [e.assigned for e in es]


def test_each_identical_group_goes_whole_to_one_replica_and_groups_spread() -> None:
    es = entries(((1, 2, 3), 4), ((7, 8), 3), ((9,), 1))
    assign(es, R, k=-1, min_colocate=0, by_tokens=False)
    a, b, lone = where(es[:4]), where(es[4:7]), es[7].assigned
    assert len(set(a)) == 1 and len(set(b)) == 1 and a[0] != b[0]
    assert lone is None  # alone in the window: no affinity, other scorers decide


def test_max_per_replica_spills_a_group_to_the_next_least_loaded() -> None:
    es = entries(((1, 2), 5))
    assign(es, R, k=2, min_colocate=0, by_tokens=False)
    assert sorted(Counter(where(es)).values()) == [1, 2, 2]


def test_shared_leading_blocks_co_locate_within_the_fair_share() -> None:
    es = entries(((1, 2, 3, 4), 2), ((1, 2, 3, 9), 1), ((1, 2, 5, 6), 1), ((42, 43), 1))
    assign(es, R, k=-1, min_colocate=2, by_tokens=False)
    group = es[0].assigned
    assert es[1].assigned == group
    assert es[2].assigned is not None and es[3].assigned is not None  # share 2 leading blocks: units
    assert es[4].assigned is None  # shares nothing
    fair = -(-4 // 4)  # the same prefix does not pile past the batch's fair share
    assert Counter(where(es[2:4])).most_common(1)[0][1] <= max(fair, 2)


def test_balancing_by_tokens_charges_a_replica_for_the_blocks_it_must_prefill() -> None:
    long, short = tuple(range(100)), (500, 501)
    es = entries((long, 2), (short, 2), ((600, 601), 2))
    assign(es, R[:2], k=-1, min_colocate=0, by_tokens=True)
    # The long prompt's replica is "full" after it: both short groups go to the other one.
    assert es[0].assigned != es[2].assigned and es[2].assigned == es[4].assigned


def params(**p: Any) -> Params:
    return Params(p, "plugins[0].parameters")


@pytest.mark.parametrize(("p", "error"), [
    ({"windowDurationMs": 0}, r"windowDurationMs: must be >= 1"),
    ({"windowDurationMs": 20000}, r"windowDurationMs: must be <= 10000"),
    ({"maxPerReplica": 0}, r"maxPerReplica: must be -1 \(unlimited\) or >= 1"),
    ({"maxBatchSize": 0}, r"maxBatchSize: must be -1"),
    ({"maxPrefixTokensToMatch": 10}, r"maxPrefixTokensToMatch: must be 0 or >= blockSizeTokens \(64\)"),
    ({"balanceBy": "bytes"}, r"balanceBy: must be one of requests, tokens"),
    ({"window": 5}, r"window: unknown parameter"),
])
def test_bad_parameters_name_the_field(p: dict[str, Any], error: str) -> None:
    with pytest.raises(ConfigError, match=error):
        BurstPrefixProducer("b", params(**p))


def burst_config(window_ms: int, max_per_replica: int) -> str:
    """The burst producer feeding the prefix scorer (this test's and the integration test's)."""
    return f"""apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: burst-prefix-cache-producer
  parameters: {{windowDurationMs: {window_ms}, maxPerReplica: {max_per_replica}, blockSizeTokens: 16}}
- type: prefix-cache-scorer
  parameters: {{prefixMatchInfoProducerName: burst-prefix-cache-producer}}
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins: [{{pluginRef: prefix-cache-scorer}}, {{pluginRef: max-score-picker}}]
"""


CONFIG = burst_config(50, 2)


async def test_requests_wait_for_their_window_and_are_placed_together() -> None:
    cfg = parse_config(CONFIG)
    scheduler, instances = cfg.build()
    store = Datastore()
    store.set_endpoints([f"10.0.0.{i}:8000" for i in range(4)])
    for a in store.addresses():
        store.record_scrape(a, EngineSignals(), 0)
    d = Director(store, scheduler, PickerMetrics(store))
    d.preparers = cfg.runtime(instances).preparers
    assert len(d.preparers) == 1
    got: list[Routed] = []
    done = asyncio.Event()

    def ready(r: Any) -> None:
        got.append(r)
        if len(got) == 5:
            done.set()

    t0 = asyncio.get_running_loop().time()
    for i in range(5):
        prompt = ("the shared rollout prompt " * 20) if i < 4 else ("another prompt entirely " * 20)
        body = orjson.dumps({"model": "m", "prompt": prompt})
        out = d.submit(RequestInput({}, "/v1/completions", body), ready=ready)
        assert not isinstance(out, Routed)  # waiting for the window
    await asyncio.wait_for(done.wait(), 5)
    assert asyncio.get_running_loop().time() - t0 >= 0.045
    placed = Counter(r.decision.primary for r in got[:4] if not isinstance(r, Exception))
    assert sorted(placed.values()) == [2, 2]  # maxPerReplica 2: the group of 4 on two pods
    burst = next(p for p in d.preparers if isinstance(p, BurstPrefixProducer))
    assert burst.batches == 1
    short = d.submit(RequestInput({}, "/v1/completions", orjson.dumps({"model": "m", "prompt": "hi"})))
    assert isinstance(short, Routed)  # under one block: nothing to share, no wait
