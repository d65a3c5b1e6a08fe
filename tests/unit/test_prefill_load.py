"""prefill-load-scorer: epp's own account of the prompt tokens each pod still has to prefill."""

from __future__ import annotations

import orjson
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from epp.config import parse_config
from epp.datastore.endpoint import EndpointState, EngineSignals
from epp.datastore.store import Datastore, Snapshot
from epp.observability.metrics import PickerMetrics
from epp.request import InferenceRequest
from epp.requestcontrol.director import Director
from epp.requestcontrol.routed import RequestInput
from epp.scheduling.prefill_load import PrefillLoadScorer, TrafficShare
from epp.server.extproc import ExtProcStream

# The prefill scorer is listed first: the scheduler still runs it after the prefix scorer.
CONFIG = """
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: prefill-load-scorer
- type: prefix-cache-scorer
  parameters: {balanceAbsThreshold: -1}
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - {pluginRef: prefill-load-scorer, weight: 5}
  - {pluginRef: prefix-cache-scorer, weight: 3}
"""
NOW = 100.0


def snap(*addrs: str) -> Snapshot:
    eps = tuple(EndpointState(a, EngineSignals(), scraped_at=NOW) for a in addrs)
    return Snapshot(eps, {}, {}, NOW, 2.0)


def req(prompt: str) -> InferenceRequest:
    return InferenceRequest("id", "/v1/completions", model="m", prompt=prompt)


def prefill_scorer(s: object) -> PrefillLoadScorer:
    found = [sc for sc, _ in s.profile.scorers if isinstance(sc, PrefillLoadScorer)]  # type: ignore[attr-defined]
    return found[0]


def test_a_pod_busy_with_a_long_cold_prompt_is_avoided_until_its_prefill_is_done() -> None:
    s, _ = parse_config(interference_config(0)).build()  # pending tokens only; traffic share: below
    assert type(s.profile.scorers[-1][0]) is PrefillLoadScorer  # ordered after the prefix scorer
    pool = snap("a", "b", "c")
    cold = s.schedule(req("a long cold document " * 1200), pool)  # ~6,000 tokens
    s.committed(cold)
    busy = cold.primary
    assert prefill_scorer(s).pending == {busy: len("a long cold document " * 1200) / 4}
    for i in range(10):
        short = s.schedule(req(f"short question {i} " * 5), pool)
        assert short.primary != busy
    s.prefill_done(cold)
    s.prefill_done(cold)  # once only
    assert prefill_scorer(s).pending == {}
    picks = {s.schedule(req(f"another {i} " * 5), pool).primary for i in range(40)}
    assert busy in picks


def test_only_the_uncached_part_of_a_prompt_is_pending() -> None:
    s, _ = parse_config(CONFIG).build()
    pool = snap("a", "b")
    system = "the same long system prompt " * 300  # 8,400 chars
    first = s.schedule(req(system + "q1"), pool)
    s.committed(first)
    s.prefill_done(first)
    second = s.schedule(req(system + "q2 with a few more words"), pool)
    assert second.primary == first.primary  # the prefix is cached there; elsewhere it all is work
    s.committed(second)
    pending = prefill_scorer(s).pending[second.primary]
    assert 0 < pending < 64  # only the tail beyond the last matched 16-token block


def test_ext_proc_releases_the_prefill_at_the_first_response_bytes() -> None:
    store = Datastore()
    store.set_endpoints(["10.0.0.1:8000", "10.0.0.2:8000"])
    for a in store.addresses():
        store.record_scrape(a, EngineSignals(), 0)
    scheduler, _ = parse_config(CONFIG).build()
    ps = Director(store, scheduler, PickerMetrics(store))
    stream = ExtProcStream(ps)
    h = pb.HttpHeaders()
    h.headers.headers.add(key=":path", raw_value=b"/v1/completions")
    first = pb.ProcessingRequest(request_headers=h)
    first.protocol_config.request_body_mode = 4
    first.protocol_config.response_body_mode = 4
    stream.on_message(first)
    body = orjson.dumps({"model": "m", "prompt": "words " * 800, "stream": True})
    stream.on_message(pb.ProcessingRequest(request_body=pb.HttpBody(body=body, end_of_stream=True)))
    scorer = prefill_scorer(scheduler)
    assert sum(scorer.pending.values()) == 1200
    stream.on_message(pb.ProcessingRequest(response_headers=pb.HttpHeaders()))
    assert sum(scorer.pending.values()) == 1200  # headers come before the prefill is done
    stream.on_message(pb.ProcessingRequest(response_body=pb.HttpBody(body=b"data: {}\n\n")))
    assert scorer.pending == {} and sum(store.inflight.values()) == 1
    stream.on_message(pb.ProcessingRequest(response_body=pb.HttpBody(end_of_stream=True)))
    assert sum(store.inflight.values()) == 0


def test_a_request_that_ends_without_a_body_releases_its_prefill() -> None:
    store = Datastore()
    store.set_endpoints(["10.0.0.1:8000"])
    store.record_scrape("10.0.0.1:8000", EngineSignals(), 0)
    scheduler, _ = parse_config(CONFIG).build()
    ps = Director(store, scheduler, PickerMetrics(store))
    pick = ps.route(RequestInput({}, "/v1/completions", model="m", prompt="text " * 400))
    assert prefill_scorer(scheduler).pending
    pick.finish()
    assert prefill_scorer(scheduler).pending == {}


def test_traffic_share_fades_old_picks_and_compares_to_an_even_share() -> None:
    share = TrafficShare(window=4)
    assert share.relative(["a", "b"]) == [0.0, 0.0]  # nothing picked yet
    for _ in range(3):
        share.add("a")
    assert share.relative(["a", "b"]) == [2.0, 0.0]
    for _ in range(12):
        share.add("b")
    a, b = share.relative(["a", "b"])
    assert a < 0.1 and a + b == 2.0  # a's picks faded by (3/4)^12
    share.weight = 1e101  # the lazy weight is rescaled before it overflows
    share.add("a")
    assert share.weight == 1.0 and share.relative(["a", "b"])[0] > a
    share.forget("a")
    assert share.relative(["a", "b"]) == [0.0, 2.0]


def interference_config(interference: float) -> str:
    return CONFIG.replace("- type: prefill-load-scorer\n",
                          f"- type: prefill-load-scorer\n  parameters: {{interference: {interference}}}\n")


def test_a_cold_long_prompt_goes_to_a_quiet_pod_and_a_warm_one_stays_with_its_cache() -> None:
    pool = snap("a", "b", "c")
    system = "the busy pod's shared system prompt " * 200

    def warm_up(s: object) -> str:
        """Thirty short requests sharing one system prompt: they all land on one pod."""
        pods = set()
        for i in range(30):
            d = s.schedule(req(f"{system} question {i}"), pool)  # type: ignore[attr-defined]
            s.committed(d)  # type: ignore[attr-defined]
            s.prefill_done(d)  # type: ignore[attr-defined]
            pods.add(d.primary)
        assert len(pods) == 1
        return pods.pop()

    s, _ = parse_config(interference_config(3)).build()
    busy = warm_up(s)
    assert prefill_scorer(s).pending == {}  # nothing pending: only the traffic share tells the pods apart
    cold = {s.schedule(req(f"document {i} " * 1500), pool).primary for i in range(20)}
    assert busy not in cold
    assert s.schedule(req(f"{system} one more question"), pool).primary == busy

    s, _ = parse_config(interference_config(0)).build()
    busy = warm_up(s)
    cold = {s.schedule(req(f"document {i} " * 1500), pool).primary for i in range(20)}
    assert busy in cold  # without the term the busy pod ties with the others
