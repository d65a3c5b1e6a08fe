"""In-flight eviction in the request path: the director and the waiting room revoke dispatched
sheddable requests through their front ends when critical work is blocked, one decision at a
time (no sockets; the clock and the front ends are driven by the test)."""

from __future__ import annotations

import logging

import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from epp.config import build, parse_config
from epp.requestcontrol.director import Director
from epp.requestcontrol.policies import RequestPolicies
from epp.requestcontrol.routed import Routed
from epp.requestcontrol.waiting import Waiting
from epp.scheduling.types import ConfigError
from epp.server.extproc import ExtProcStream

from .test_waiting_room import Answers, Clock, config, req, setup

EVICTING = "  enableEviction: true"
OBJECTIVES = [{"kind": "InferenceObjective", "metadata": {"name": "critical"}, "spec": {"priority": 10}},
              {"kind": "InferenceObjective", "metadata": {"name": "batch"}, "spec": {"priority": -1}}]


class FrontEnd:
    """What an ext_proc stream does when its request is revoked: answers 429 and ends it."""

    def __init__(self, hangs: bool = False) -> None:
        self.revoked: list[Routed] = []
        self.hangs = hangs

    def attach(self, routed: Routed | Waiting) -> Routed:
        assert isinstance(routed, Routed)
        routed.revoke = lambda: self._revoke(routed)
        return routed

    def _revoke(self, routed: Routed) -> None:
        self.revoked.append(routed)
        if not self.hangs:
            routed.status = 429
            routed.finish()


def evicting(text: str = EVICTING) -> tuple[Director, Clock]:
    d, clock, _ = setup(config(text))
    d.policies = RequestPolicies.build(OBJECTIVES, pool=None)
    return d, clock


def sample(d: Director, name: str, labels: dict[str, str]) -> float | None:
    return d.metrics.sample_value(name, {**labels, "inference_pool": "pool"})


def test_critical_work_revokes_the_newest_sheddable_one_decision_at_a_time() -> None:
    d, clock = evicting()
    fe = FrontEnd()
    old = fe.attach(d.submit(req(objective="batch"), ready=Answers()))
    clock.now += 1
    new = fe.attach(d.submit(req(objective="batch"), ready=Answers()))  # the pool is full (2 x 1)
    second = Answers()
    first = d.submit(req(objective="critical"), ready=Answers())
    assert fe.revoked == [new] and new.done and new.status == 429  # the newest dispatch goes first
    assert new.revoke is None  # dropped at the end: the front end and its pick hold no cycle
    assert isinstance(first, Routed) and first.endpoint == new.endpoint  # at once, into the capacity it freed
    assert isinstance(d.submit(req(objective="critical"), ready=second), Waiting)
    assert fe.revoked == [new] and second.got == []  # cooling: the next decision waits for the grace
    clock.now += 0.02  # past the concurrency detector's 10 ms
    assert d.waiting is not None
    d.waiting.tick()
    assert fe.revoked == [new, old] and len(second.got) == 1
    third = Answers()
    assert isinstance(d.submit(req(objective="critical"), ready=third), Waiting)
    clock.now += 1
    d.waiting.tick()
    assert third.got == [] and len(fe.revoked) == 2  # nothing sheddable runs now: it waits its turn
    assert sample(d, "llm_d_epp_flow_control_revocations_issued_total", {"priority": "10"}) == 2
    assert sample(d, "llm_d_epp_flow_control_revocations_total", {"outcome": "confirmed"}) == 2
    assert sample(d, "llm_d_epp_flow_control_revocation_confirmation_seconds_count", {}) == 2


@pytest.mark.parametrize("order", ["priority-then-progress-eviction-order-policy", None])
def test_the_progress_order_revokes_a_request_whose_response_has_not_started(order: str | None) -> None:
    text = config(EVICTING)
    if order is not None:
        text = text.replace("plugins:\n", f"plugins:\n- type: {order}\n", 1)
    d, clock, _ = setup(text)
    d.policies = RequestPolicies.build(OBJECTIVES, pool=None)
    fe = FrontEnd()
    waiting = fe.attach(d.submit(req(objective="batch"), ready=Answers()))
    clock.now += 1
    streaming = fe.attach(d.submit(req(objective="batch"), ready=Answers()))
    streaming.response_body(b"data: {}\n\n", False)  # its first bytes: the newest one is streaming
    assert isinstance(d.submit(req(objective="critical"), ready=Answers()), Routed)
    # epp's order spares the stream under way; the reference's takes the newest dispatch
    assert fe.revoked == ([waiting] if order else [streaming])


def test_sheddable_work_never_evicts_its_own_band_nor_standard_work_a_standard_request() -> None:
    d, _ = evicting()
    fe = FrontEnd()
    fe.attach(d.submit(req(objective="batch"), ready=Answers()))
    fe.attach(d.submit(req(), ready=Answers()))
    assert isinstance(d.submit(req(objective="batch"), ready=Answers()), Waiting)
    assert fe.revoked == []  # same band: no churn
    assert isinstance(d.submit(req(), ready=Answers()), Routed)  # standard work (0) is above it
    assert len(fe.revoked) == 1 and fe.revoked[0].request.priority == -1


def test_a_request_its_front_end_cannot_end_is_never_chosen() -> None:
    d, _ = evicting()
    fe = FrontEnd()
    for _ in range(2):
        assert isinstance(d.submit(req(objective="batch"), ready=Answers()), Routed)  # the Pick API: no revoke
    held = Answers()
    assert isinstance(d.submit(req(objective="critical"), ready=held), Waiting)
    assert held.got == [] and fe.revoked == []
    assert d.waiting is not None and d.waiting.inflight is not None
    assert (len(d.waiting.inflight), d.waiting.inflight.evictable) == (2, 0)  # still counted in flight


def test_a_revocation_that_never_ends_holds_the_gate_until_its_timeout(caplog: pytest.LogCaptureFixture) -> None:
    d, clock = evicting()
    fe = FrontEnd(hangs=True)
    fe.attach(d.submit(req(objective="batch"), ready=Answers()))
    fe.attach(d.submit(req(objective="batch"), ready=Answers()))
    assert isinstance(d.submit(req(objective="critical"), ready=Answers()), Waiting)
    assert len(fe.revoked) == 1
    assert d.waiting is not None
    clock.now += 5
    d.waiting.tick()
    assert len(fe.revoked) == 1  # unconfirmed: no second decision on a gauge that has not moved
    clock.now += 5.1
    with caplog.at_level(logging.WARNING, "epp.flowcontrol"):
        d.waiting.tick()
    assert "did not end within 10 s" in caplog.text
    assert sample(d, "llm_d_epp_flow_control_revocations_total", {"outcome": "timed_out"}) == 1
    clock.now += 0.02
    d.waiting.tick()
    assert len(fe.revoked) == 2  # the gate reopened: the other one goes


def test_off_by_default_and_a_reload_turns_it_on_for_requests_dispatched_after() -> None:
    d, _ = evicting("")
    fe = FrontEnd()
    fe.attach(d.submit(req(objective="batch"), ready=Answers()))
    assert d.waiting is not None and d.waiting.inflight is None
    d.set_flow_control(build(parse_config(config(EVICTING))).runtime().flow)
    fe.attach(d.submit(req(objective="batch"), ready=Answers()))
    assert isinstance(d.submit(req(objective="critical"), ready=Answers()), Routed)
    assert len(fe.revoked) == 1 and d.waiting.inflight is not None and len(d.waiting.inflight) == 1


def test_enable_eviction_config() -> None:
    assert parse_config(config(EVICTING)).flow is not None
    with pytest.raises(ConfigError, match=r"flowControl.enableEviction: expected true or false"):
        parse_config(config("  enableEviction: yes-please"))
    two = config(EVICTING).replace("plugins:\n", "plugins:\n- type: sheddable-eviction-filter\n"
                                                 "- {type: sheddable-eviction-filter, name: other}\n", 1)
    with pytest.raises(ConfigError, match=r"plugins\[1\]\.type: a second eviction filter policy"):
        parse_config(two)
    with pytest.raises(ConfigError, match=r"plugins\[0\]\.parameters"):
        parse_config(config(EVICTING).replace("plugins:\n", "plugins:\n- type: priority-then-time-eviction-order-"
                                                             "policy\n  parameters: {x: 1}\n", 1))


def test_a_declared_eviction_policy_is_the_one_used_and_unused_ones_are_said(caplog: pytest.LogCaptureFixture) -> None:
    text = config(EVICTING).replace("plugins:\n", "plugins:\n- {type: sheddable-eviction-filter, name: mine}\n", 1)
    settings = build(parse_config(text)).runtime().flow
    assert settings is not None and settings.eviction is not None and settings.eviction.filter.name == "mine"
    with caplog.at_level(logging.WARNING, "epp.config"):
        parse_config(config().replace("plugins:\n", "plugins:\n- type: sheddable-eviction-filter\n", 1))
    assert "used only with flowControl.enableEviction: true" in caplog.text


def _stream_request(d: Director, objective: str) -> tuple[ExtProcStream, list[list[bytes]]]:
    """An ext_proc stream in gateway mode (both bodies full duplex) that has sent its request."""
    stream = ExtProcStream(d)
    sent: list[list[bytes]] = []
    stream.emit = sent.append
    h = pb.HttpHeaders()
    for k, v in ((":path", "/v1/completions"), ("content-type", "application/json"),
                 ("x-llm-d-inference-objective", objective)):
        h.headers.headers.add(key=k, raw_value=v.encode())
    msg = pb.ProcessingRequest(request_headers=h)
    msg.protocol_config.request_body_mode = msg.protocol_config.response_body_mode = 4  # FULL_DUPLEX_STREAMED
    assert stream.on_message(msg) == []
    body = b'{"model": "m", "prompt": "hi", "stream": true}'
    out = stream.on_message(pb.ProcessingRequest(request_body=pb.HttpBody(body=body, end_of_stream=True)))
    assert [pb.ProcessingResponse.FromString(m).WhichOneof("response") for m in out] == ["request_headers",
                                                                                         "request_body"]
    return stream, sent


RESPONSE_HEADERS = pb.ProcessingRequest(response_headers=pb.HttpHeaders(headers={"headers": [
    {"key": ":status", "raw_value": b"200"}]}))
FIRST_CHUNK = pb.ProcessingRequest(response_body=pb.HttpBody(body=b"data: {}\n\n"))


def test_a_revocable_streams_response_headers_wait_for_its_first_bytes() -> None:
    d, _ = evicting()
    batch, _ = _stream_request(d, "batch")
    assert batch.pick is not None and batch.pick.revocable
    assert batch.on_message(RESPONSE_HEADERS) == []  # held: the client sees nothing yet
    out = batch.on_message(FIRST_CHUNK)
    assert [pb.ProcessingResponse.FromString(m).WhichOneof("response") for m in out] == ["response_headers",
                                                                                         "response_body"]
    bodiless, _ = _stream_request(d, "batch")
    assert bodiless.on_message(RESPONSE_HEADERS) == []
    out = bodiless.on_message(pb.ProcessingRequest(response_trailers=pb.HttpTrailers()))
    assert [pb.ProcessingResponse.FromString(m).WhichOneof("response") for m in out] == ["response_headers",
                                                                                         "response_trailers"]
    standard, _ = _stream_request(d, "")
    assert standard.pick is not None and not standard.pick.revocable  # priority 0: never a victim
    assert len(standard.on_message(RESPONSE_HEADERS)) == 1  # answered at once, as without eviction


def test_a_stream_revoked_before_its_first_bytes_answers_a_whole_429() -> None:
    d, clock = evicting()
    first, _ = _stream_request(d, "batch")
    clock.now += 1
    second, sent = _stream_request(d, "batch")
    assert second.on_message(RESPONSE_HEADERS) == []
    critical = Answers()
    assert isinstance(d.submit(req(objective="critical"), ready=critical), Waiting)  # the newest is revoked
    (answer,) = sent[-1]
    immediate = pb.ProcessingResponse.FromString(answer).immediate_response
    assert immediate.status.code == 429
    assert b'"RateLimitError"' in immediate.body
    assert second.on_message(FIRST_CHUNK) == []  # (what the gateway sent before it saw the answer)
    assert second.ended
    second.close()  # (the transport ends an ended stream)
    assert len(critical.got) == 1 and isinstance(critical.got[0], Routed)  # into the capacity it freed
    assert first.pick is not None and not first.pick.done
