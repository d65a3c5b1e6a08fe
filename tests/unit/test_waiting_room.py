"""Flow control in the request path: the director, the waiting room and the ext_proc stream,
driven message by message (no sockets; the timer is driven by the test)."""

from __future__ import annotations

import logging
from typing import Any

import orjson
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from epp.config import Built, build, parse_config
from epp.datastore.endpoint import EngineSignals
from epp.datastore.store import Datastore
from epp.observability.flowmetrics import FlowMetrics
from epp.observability.metrics import PickerMetrics
from epp.requestcontrol.director import Director
from epp.requestcontrol.refused import Refused
from epp.requestcontrol.routed import RequestInput, Routed
from epp.requestcontrol.waiting import Waiting
from epp.scheduling.types import ConfigError
from epp.server.extproc import ExtProcStream

ADDRS = ["10.0.0.1:8000", "10.0.0.2:8000"]


def config(flow: str = "", detector: str = "maxConcurrency: 1", gate: str = "featureGates: [flowControl]") -> str:
    return f"""
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
{gate}
plugins:
- type: concurrency-detector
  parameters: {{{detector}}}
- type: round-robin-fairness-policy
- type: queue-scorer
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: queue-scorer
flowControl:
  saturationDetector: {{pluginRef: concurrency-detector}}
{flow}
"""


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def setup(text: str, addrs: list[str] = ADDRS) -> tuple[Director, Clock, Built]:
    store = Datastore()
    store.set_endpoints(addrs)
    for a in addrs:
        store.record_scrape(a, EngineSignals(), 0)
    built = build(parse_config(text))
    metrics = PickerMetrics(store)
    d = Director(store, built.scheduler, metrics)
    d.set_flow_control(built.runtime().flow, FlowMetrics(metrics.registry, "pool"))
    clock = Clock()
    assert d.waiting is not None
    d.waiting.clock = clock
    return d, clock, built


def req(fairness: str = "", objective: str = "", prompt: str = "hello") -> RequestInput:
    headers = {"x-llm-d-inference-fairness-id": fairness} if fairness else {}
    if objective:
        headers["x-llm-d-inference-objective"] = objective
    return RequestInput(headers, "/v1/completions", model="m", prompt=prompt)


class Answers:
    def __init__(self) -> None:
        self.got: list[Routed | Refused] = []

    def __call__(self, result: Routed | Refused) -> None:
        self.got.append(result)


def test_an_idle_pool_dispatches_at_once_and_a_full_one_holds_until_a_response_ends() -> None:
    d, _, _ = setup(config())
    first = d.submit(req(), ready=Answers())
    second = d.submit(req(), ready=Answers())
    assert isinstance(first, Routed) and isinstance(second, Routed)  # one per endpoint (maxConcurrency 1)
    assert first.endpoint != second.endpoint
    answers = Answers()
    held = d.submit(req(), ready=answers)
    assert isinstance(held, Waiting) and answers.got == []
    first.finish()  # capacity frees: the held request is scheduled now, on the endpoint that freed
    assert len(answers.got) == 1
    late = answers.got[0]
    assert isinstance(late, Routed) and late.endpoint == first.endpoint and late.queued >= 0.0
    assert dict(late.explain())["x-epp-queue-ms"]


def test_cap_per_endpoint_is_refused_on_a_detector_that_is_not_the_saturation_detector() -> None:
    text = config(detector="maxConcurrency: 4").replace(
        "- type: round-robin-fairness-policy", "- type: concurrency-detector\n  name: filter-only\n"
        "  parameters: {maxConcurrency: 4, capPerEndpoint: true}\n- type: round-robin-fairness-policy")
    with pytest.raises(ConfigError, match=r"plugins\[1\]\.parameters\.capPerEndpoint: .*'filter-only' is not the "
                                          "saturation detector"):
        parse_config(text)
    build(parse_config(config(detector="maxConcurrency: 4, capPerEndpoint: true")))  # as the detector: accepted


def test_tokens_must_fit_holds_a_long_prompt_until_a_pod_has_computed_what_it_had() -> None:
    text = """
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
featureGates: [flowControl]
plugins:
- type: concurrency-detector
  parameters: {concurrencyMode: hybrid, maxConcurrency: 64, maxTokenConcurrency: 2000, tokensMustFit: true}
- type: prefix-cache-scorer
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: concurrency-detector
  - pluginRef: prefix-cache-scorer
flowControl:
  saturationDetector: {pluginRef: concurrency-detector}
"""
    off = build(parse_config(text.replace(", tokensMustFit: true", "").replace("- type: prefix-cache-scorer\n", "")
                             .replace("  - pluginRef: prefix-cache-scorer\n", "")))
    assert off.scheduler.profile.prefix_producers == []  # without it the detector reads no prefix match
    d, _, built = setup(text)
    detector = built.instances[next(k for k in built.instances if k.startswith("concurrency-detector"))]
    scorer = built.instances[next(k for k in built.instances if k.startswith("prefix-cache-scorer"))]
    assert detector.producer is not None and detector.producer is scorer.producer  # one prefix match per pick
    long_a = d.submit(req(prompt="a" * 12_000), ready=Answers())  # ~3,000 tokens to compute
    short = d.submit(req(prompt="a question"), ready=Answers())
    assert isinstance(long_a, Routed) and isinstance(short, Routed)
    assert short.endpoint != long_a.endpoint  # not computed in the long prompt's step
    answers = Answers()
    held = d.submit(req(prompt="b" * 12_000), ready=answers)
    assert isinstance(held, Waiting) and answers.got == []  # both pods have prompts pending
    long_a.first_bytes()  # the first pod has computed its prompt: nothing pending there now
    assert len(answers.got) == 1
    late = answers.got[0]
    assert isinstance(late, Routed) and late.endpoint == long_a.endpoint


def test_priorities_dispatch_first_and_fairness_alternates_flows() -> None:
    d, _, _ = setup(config("  defaultPriorityBand: {fairnessPolicyRef: round-robin-fairness-policy}"), ADDRS[:1])
    from epp.requestcontrol.policies import RequestPolicies

    d.policies = RequestPolicies.build([{"kind": "InferenceObjective", "metadata": {"name": "critical"},
                                         "spec": {"priority": 10}}], pool=None)
    busy = d.submit(req(), ready=Answers())
    assert isinstance(busy, Routed)
    order: list[str] = []

    def tagged(tag: str) -> Any:
        def ready(result: Routed | Refused) -> None:
            order.append(tag)
            assert isinstance(result, Routed)
            result.finish()  # each ends at once, letting the next one go
        return ready

    for i in range(3):
        assert isinstance(d.submit(req("A"), ready=tagged(f"A{i}")), Waiting)
    assert isinstance(d.submit(req("B"), ready=tagged("B0")), Waiting)
    assert isinstance(d.submit(req("C", objective="critical"), ready=tagged("critical")), Waiting)
    busy.finish()
    assert order == ["critical", "A0", "B0", "A1", "A2"]


def test_ttl_expiry_is_429_json_with_the_drop_reason_and_an_empty_pool_is_503() -> None:
    d, clock, _ = setup(config("  defaultRequestTTL: 2s\n  noEndpointRequestTTL: 30s"))
    room = d.waiting
    assert room is not None
    for _ in range(2):
        d.submit(req(), ready=Answers())
    answers = Answers()
    assert isinstance(d.submit(req(), ready=answers), Waiting)
    clock.now += 1.0
    room.tick()
    assert answers.got == []
    clock.now += 1.5
    room.tick()
    refused = answers.got[0]
    assert isinstance(refused, Refused) and refused.status == 429 and refused.dropped == "rejected-ttl-expired"
    assert orjson.loads(refused.body())["error"]["type"] == "RateLimitError"
    # Scale to zero: requests wait for an endpoint (noEndpointRequestTTL), then 503.
    d.store.set_endpoints([])
    waiting = Answers()
    assert isinstance(d.submit(req(), ready=waiting), Waiting)
    clock.now += 29.0
    room.tick()
    assert waiting.got == []
    clock.now += 2.0
    room.tick()
    gone = waiting.got[0]
    assert isinstance(gone, Refused) and gone.status == 503 and gone.dropped == "rejected-no-endpoints"


def test_a_request_waiting_for_the_first_endpoint_goes_when_one_appears() -> None:
    d, clock, _ = setup(config(), [])
    answers = Answers()
    assert isinstance(d.submit(req(), ready=answers), Waiting)
    d.store.set_endpoints(ADDRS[:1])
    d.store.record_scrape(ADDRS[0], EngineSignals(), 0)
    clock.now += 0.05
    assert d.waiting is not None
    d.waiting.tick()
    assert isinstance(answers.got[0], Routed) and answers.got[0].endpoint == ADDRS[0]


def test_caps_reject_at_once_and_a_cancelled_request_is_never_dispatched() -> None:
    d, _, _ = setup(config("  maxRequests: 1"))
    for _ in range(2):
        d.submit(req(), ready=Answers())
    gone = Answers()
    held = d.submit(req(), ready=gone)
    assert isinstance(held, Waiting)
    with pytest.raises(Refused) as e:
        d.submit(req(), ready=Answers())
    assert e.value.status == 429 and e.value.dropped == "rejected-saturated"
    held.cancel()  # the client went away
    after = Answers()
    assert isinstance(d.submit(req(), ready=after), Waiting)  # its room is free again
    assert d.waiting is not None
    d.waiting.pump()
    assert gone.got == []


def test_a_reload_keeps_queued_requests_and_turning_the_gate_off_releases_them() -> None:
    d, _, built = setup(config())
    for _ in range(2):
        d.submit(req(), ready=Answers())
    answers = Answers()
    assert isinstance(d.submit(req(), ready=answers), Waiting)
    newer = build(parse_config(config("  defaultRequestTTL: 5s", detector="maxConcurrency: 1")), built)
    d.set_flow_control(newer.runtime().flow)
    assert answers.got == [] and d.waiting is not None and d.waiting.controller.queues.totals.count == 1
    off = build(parse_config(config(gate="")), newer)
    assert off.runtime().flow is None
    d.set_flow_control(None)
    assert isinstance(answers.got[0], Routed)


def test_ext_proc_holds_the_headers_answer_and_sends_it_when_the_request_dispatches() -> None:
    d, _, _ = setup(config())
    first = d.submit(req(), ready=Answers())
    d.submit(req(), ready=Answers())
    stream = ExtProcStream(d)
    sent: list[list[bytes]] = []
    stream.emit = sent.append
    headers = pb.ProcessingRequest(request_headers=pb.HttpHeaders(headers={"headers": [
        {"key": ":path", "raw_value": b"/v1/completions"}, {"key": "content-type", "raw_value": b"application/json"}]}))
    assert stream.on_message(headers) == []
    body = b'{"model": "m", "prompt": "hi"}'
    assert stream.on_message(pb.ProcessingRequest(request_body=pb.HttpBody(body=body, end_of_stream=True))) == []
    assert stream.on_message(pb.ProcessingRequest(request_trailers=pb.HttpTrailers())) == []  # held behind the pick
    room = d.waiting
    assert room is not None
    assert isinstance(first, Routed)
    first.finish()
    assert len(sent) == 1
    kinds = [pb.ProcessingResponse.FromString(m).WhichOneof("response") for m in sent[0]]
    assert kinds == ["request_headers", "request_body", "request_trailers"]
    assert stream.pick is not None


def test_ext_proc_stream_reset_while_held_leaves_the_queue() -> None:
    d, _, _ = setup(config())
    for _ in range(2):
        d.submit(req(), ready=Answers())
    stream = ExtProcStream(d)
    headers = pb.ProcessingRequest(request_headers=pb.HttpHeaders(headers={"headers": [
        {"key": ":path", "raw_value": b"/v1/models"}]}, end_of_stream=True))
    assert stream.on_message(headers) == []
    assert d.waiting is not None and d.waiting.controller.queues.totals.count == 1
    stream.close()
    assert d.waiting.controller.queues.totals.count == 0


def test_flow_control_config_is_strict_with_paths() -> None:
    for flow, message in [
        ("  bogus: 1", "flowControl.bogus: unknown field"),
        ("  maxBytes: lots", "flowControl.maxBytes: invalid quantity"),
        ("  priorityBands: [{priority: 1}, {priority: 1}]", r"priorityBands\[1\].priority: priority 1 is configured"),
        ("  priorityBands: [{maxRequests: 5}]", r"priorityBands\[0\].priority: required"),
        ("  defaultPriorityBand: {fairnessPolicyRef: queue-scorer}", "is a scorer, not a fairness policy"),
        ("  usageLimitPolicyPluginRef: nope", "no plugin named 'nope'"),
        ("  defaultRequestTTL: soon", "defaultRequestTTL"),
    ]:
        with pytest.raises(ConfigError, match=message):
            parse_config(config(flow))
    plan = parse_config(config("  maxBytes: 1Gi\n  maxRequests: 1k\n  defaultRequestTTL: 0s")).flow
    assert plan is not None and (plan.max_bytes, plan.max_requests, plan.default_ttl) == (2**30, 1000, 0.0)
    assert plan.no_endpoint_ttl == 0.0  # follows defaultRequestTTL unless given


def test_a_flow_control_section_with_the_gate_off_is_validated_and_warned_about(caplog: Any) -> None:
    with caplog.at_level(logging.WARNING, "epp.config"):
        assert parse_config(config("  maxRequests: 10", gate="")).flow is None
    assert "feature gate is off" in caplog.text
    with pytest.raises(ConfigError, match=r"flowControl\.bogus"):
        parse_config(config("  bogus: 1", gate=""))


def test_in_flight_tokens_are_the_uncached_prompt_until_the_first_byte() -> None:
    text = """
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: prefix-cache-scorer
  parameters: {blockSizeTokens: 16}
schedulingProfiles:
- name: default
  plugins:
  - {pluginRef: prefix-cache-scorer, weight: 1}
"""
    store = Datastore()
    store.set_endpoints(ADDRS[:1])
    store.record_scrape(ADDRS[0], EngineSignals(), 0)
    d = Director(store, build(parse_config(text)).scheduler, PickerMetrics(store))
    prompt = "the same long prompt " * 200  # 4,200 characters: 1,050 estimated tokens
    first = d.route(req(prompt=prompt))
    assert store.inflight_tokens[ADDRS[0]] == len(prompt) // 4  # nothing cached yet
    first.first_bytes()
    assert ADDRS[0] not in store.inflight_tokens  # prefilled
    second = d.route(req(prompt=prompt))
    assert store.inflight_tokens.get(ADDRS[0], 0) < 64  # the prefix the pod has cached is not counted
    second.finish()
    first.finish()


def test_a_request_held_by_the_token_limit_goes_when_the_prefill_ahead_is_done() -> None:
    d, _, _ = setup(config(detector="maxTokenConcurrency: 100, concurrencyMode: tokens"), ADDRS[:1])
    first = d.submit(req(prompt="x" * 800), ready=Answers())  # 200 estimated tokens to prefill
    assert isinstance(first, Routed)
    answers = Answers()
    assert isinstance(d.submit(req(prompt="y" * 800), ready=answers), Waiting)
    first.first_bytes()  # the prefill is done, the response still streams: the pool has room now
    assert len(answers.got) == 1 and isinstance(answers.got[0], Routed) and not first.done


LEAST_PREFILL = """
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
featureGates: [flowControl]
plugins:
- type: concurrency-detector
  parameters: {maxConcurrency: 1}
- type: prefix-cache-scorer
  parameters: {blockSizeTokens: 16}
- type: least-prefill-ordering-policy
schedulingProfiles:
- name: default
  plugins:
  - {pluginRef: prefix-cache-scorer, weight: 1}
flowControl:
  saturationDetector: {pluginRef: concurrency-detector}
  defaultPriorityBand: {orderingPolicyRef: least-prefill-ordering-policy}
"""


def test_least_prefill_ordering_dispatches_a_warm_prompt_before_an_earlier_cold_one() -> None:
    d, clock, _ = setup(LEAST_PREFILL, ADDRS[:1])
    chat = "the conversation so far " * 100
    first = d.submit(req(prompt=chat), ready=Answers())
    assert isinstance(first, Routed)
    cold, warm = Answers(), Answers()
    assert isinstance(d.submit(req(prompt="a prompt nobody sent before " * 100), ready=cold), Waiting)
    clock.now += 0.1
    assert isinstance(d.submit(req(prompt=chat + " and one more question"), ready=warm), Waiting)
    first.finish()
    assert len(warm.got) == 1 and cold.got == []  # the pod has the chat cached: it goes first
    assert isinstance(warm.got[0], Routed)
    warm.got[0].finish()
    assert len(cold.got) == 1


def test_the_probabilistic_admitter_sheds_sheddable_requests_by_saturation() -> None:
    from epp.requestcontrol.admitters import ProbabilisticAdmitter
    from epp.scheduling.params import Params

    admitter = ProbabilisticAdmitter("pa", Params({}, "pa"))
    store = Datastore()
    store.set_endpoints(ADDRS)
    from epp.request import InferenceRequest

    low = InferenceRequest("r", "/v1/completions")
    low.priority = -1
    for a in ADDRS:
        store.record_scrape(a, EngineSignals(waiting=0.5), 0)  # saturation 0.1: p = 0.1^5 * 300 = 0.003
    shed = sum(admitter.admit(low, store.snapshot()) is not None for _ in range(2000))
    assert shed < 30
    for a in ADDRS:
        store.record_scrape(a, EngineSignals(waiting=2.0), 0)  # saturation 0.4: p = 1
    refused = admitter.admit(low, store.snapshot())
    assert refused is not None and refused.status == 429 and refused.dropped == "rejected-saturated"
    assert admitter.admit(InferenceRequest("r", "/v1/completions"), store.snapshot()) is None  # priority 0


def test_admitters_listed_in_the_config_run_before_scheduling() -> None:
    text = """
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: probabilistic-admitter
  parameters: {k: 1000000}
- type: queue-scorer
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: queue-scorer
"""
    store = Datastore()
    store.set_endpoints(ADDRS)
    for a in ADDRS:
        store.record_scrape(a, EngineSignals(waiting=1.0), 0)
    built = build(parse_config(text))
    d = Director(store, built.scheduler, PickerMetrics(store))
    d.admitters = built.runtime().admitters
    from epp.requestcontrol.policies import RequestPolicies

    d.policies = RequestPolicies.build([{"kind": "InferenceObjective", "metadata": {"name": "batch"},
                                         "spec": {"priority": -1}}], pool=None)
    with pytest.raises(Refused) as e:
        d.route(req(objective="batch"))
    assert e.value.status == 429
    assert isinstance(d.route(req()), Routed)


def test_program_aware_fairness_hears_each_programs_usage_from_the_response() -> None:
    from epp.requestcontrol.routed import ResponseAccess

    d, _, _ = setup(config("  defaultPriorityBand: {fairnessPolicyRef: program-aware-fairness}")
                    .replace("- type: round-robin-fairness-policy", "- type: program-aware-fairness"), ADDRS[:1])
    busy = d.submit(req("tenant-a"), ResponseAccess.READ, ready=Answers())
    assert isinstance(busy, Routed)
    answers = Answers()
    assert isinstance(d.submit(req("tenant-b"), ResponseAccess.READ, ready=answers), Waiting)
    busy.finish()
    late = answers.got[0]
    assert isinstance(late, Routed) and late.flow is not None
    late.response_body(b'{"choices":[],"usage":{"prompt_tokens":100,"completion_tokens":20}}', True)
    policy = late.flow[1]
    assert policy.programs["tenant-b"].service == 140.0  # prompt + 2 x completion  # type: ignore[attr-defined]
    assert policy.programs["tenant-b"].dispatched == 1  # type: ignore[attr-defined]


@pytest.mark.parametrize("sample", ["sim-program-aware-config.yaml", "soft-reflective-ceiling-epp-config.yaml",
                                    "probabilistic-admitter-epp-config.yaml"])
def test_the_references_flow_control_samples_load_and_do_what_they_say(sample: str) -> None:
    from pathlib import Path

    from epp.config import load_config

    rt = build(load_config(str(Path(__file__).resolve().parents[1] / "fixtures" / "reference" / sample))).runtime()
    if sample.startswith("sim-program-aware"):
        assert rt.flow is not None and rt.flow.default_band.fairness is not None
        assert rt.flow.default_band.fairness.type_name == "program-aware-fairness"
    elif sample.startswith("soft-reflective"):
        assert rt.flow is not None and rt.flow.usage_limit.type_name == "soft-reflective-ceiling-policy"
    else:  # flow control off; the admitter sheds, the detector's thresholds never gate
        assert rt.flow is None and [a.type_name for a in rt.admitters] == ["probabilistic-admitter"]
        assert rt.detector.queue_depth == 999999999  # type: ignore[attr-defined]


def test_pods_not_scraped_yet_are_no_capacity_while_a_scraped_one_exists() -> None:
    d, _, _ = setup(config(), ADDRS[:1])
    d.store.set_endpoints(ADDRS)  # the second pod appears; its metrics are not read yet
    assert isinstance(d.submit(req(), ready=Answers()), Routed)
    answers = Answers()
    assert isinstance(d.submit(req(), ready=answers), Waiting)  # held, not sent to be refused
    assert answers.got == []
    d.store.record_scrape(ADDRS[1], EngineSignals(), 0)
    assert d.waiting is not None
    d.waiting.tick()
    assert isinstance(answers.got[0], Routed) and answers.got[0].endpoint == ADDRS[1]


class Timers:
    """The event loop's call_later, recorded: (delay, callback) of each timer armed."""

    def __init__(self) -> None:
        self.armed: list[tuple[float, Any]] = []
        self.cancelled = 0

    def call_later(self, delay: float, callback: Any) -> Any:
        self.armed.append((delay, callback))
        return self

    def cancel(self) -> None:  # (the handle's)
        self.cancelled += 1


def test_a_detector_that_frees_capacity_with_time_is_met_by_a_tick_at_that_moment() -> None:
    clock = [50.0]
    store = Datastore(clock=lambda: clock[0])
    store.set_endpoints(ADDRS[:1])
    store.record_scrape(ADDRS[0], EngineSignals(), 0)
    text = config(detector="concurrencyMode: hybrid, maxConcurrency: 10, maxTokenConcurrency: 10, "
                           "prefillLookahead: 5ms, prefillTokensPerSecond: 60000")
    built = build(parse_config(text))
    d = Director(store, built.scheduler, PickerMetrics(store))
    d.set_flow_control(built.runtime().flow)
    room = d.waiting
    assert room is not None
    timers = Timers()
    room._timers = lambda: timers  # (the event loop's, recorded)
    first = d.submit(req(prompt="hello " * 400), ready=Answers())
    assert isinstance(first, Routed) and store.snapshot().inflight_tokens  # its prompt fills the pod
    later = Answers()
    assert isinstance(d.submit(req(prompt="again " * 400), ready=later), Waiting)
    delay, tick = timers.armed[-1]
    assert 0 < delay < 0.02  # sooner than the regular tick: the backlog is computed in a few ms
    clock[0] += delay  # the datastore's clock reaches the moment; the room's own clock may differ
    tick()
    assert len(later.got) == 1 and isinstance(later.got[0], Routed)  # sent before the first bytes came
