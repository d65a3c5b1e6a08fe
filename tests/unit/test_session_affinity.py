"""session-affinity-scorer: both of the reference's strategies, as pure scheduling."""

from __future__ import annotations

import base64
from dataclasses import replace

import pytest

from epp.config import parse_config
from epp.datastore.endpoint import EndpointState, EngineSignals
from epp.datastore.store import Snapshot
from epp.request import InferenceRequest
from epp.scheduling.framework import Scheduler
from epp.scheduling.types import ConfigError


def doc(params: str = "{}") -> str:
    return f"""apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: queue-scorer
- {{type: session-affinity-scorer, parameters: {params}}}
schedulingProfiles:
- name: default
  plugins:
  - {{pluginRef: queue-scorer, weight: 1}}
  - {{pluginRef: session-affinity-scorer, weight: 10}}
"""


def pool(now: float = 1000.0) -> Snapshot:
    eps = tuple(EndpointState(a, EngineSignals(), scraped_at=now) for a in ("10.0.0.1:8000", "10.0.0.2:8000"))
    return Snapshot(eps, {}, {}, now, 2.0)


def req(**headers: str) -> InferenceRequest:
    return InferenceRequest("id", "/v1/completions", model="m", prompt="hi",
                            headers={k.replace("_", "-"): v for k, v in headers.items()})


def busy(snap: Snapshot, addr: str) -> Snapshot:
    """``addr`` has a long queue: without affinity the queue scorer sends requests elsewhere."""
    eps = tuple(replace(e, signals=EngineSignals(waiting=50)) if e.address == addr else e for e in snap.endpoints)
    return replace(snap, endpoints=eps)


def build(params: str = "{}") -> Scheduler:
    s, _ = parse_config(doc(params)).build()
    return s


def test_the_encoded_endpoint_header_brings_a_session_back_to_its_pod() -> None:
    s = build()
    first = s.schedule(req(), pool())
    s.committed(first)
    token = dict(s.response_headers(first, first.primary))["x-session-token"]
    assert base64.b64decode(token).decode() == first.primary
    again = s.schedule(req(x_session_token=token), busy(pool(), first.primary))
    assert again.primary == first.primary  # affinity (10) beats the queue (1)
    other = s.schedule(req(x_session_token="not base64!"), busy(pool(), first.primary))
    assert other.primary != first.primary
    custom = build("{encodedEndpointHeaderConfig: {header: X-Sticky}}")
    assert [k for k, _ in custom.response_headers(first, "10.0.0.2:8000")] == ["x-sticky"]


def test_a_session_id_binds_to_the_pod_that_served_it_until_its_ttl() -> None:
    s = build("{strategy: session_id, sessionIdConfig: {evictionTtlSeconds: 60, evictionSweepSeconds: 1}}")
    first = s.schedule(req(x_session_id="chat-1"), pool())
    s.committed(first)
    assert s.response_headers(first, first.primary) == []  # nothing is written back
    assert s.schedule(req(x_session_id="chat-1"), busy(pool(1030.0), first.primary)).primary == first.primary
    assert s.schedule(req(x_session_id="chat-2"), busy(pool(1030.0), first.primary)).primary != first.primary
    late = s.schedule(req(x_session_id="chat-1"), busy(pool(1200.0), first.primary))  # the binding expired
    assert late.primary != first.primary
    s.committed(late)  # rebound to where it went
    assert s.schedule(req(x_session_id="chat-1"), busy(pool(1201.0), first.primary)).primary == late.primary
    long_id = "x" * 10_000  # kept as its hash: a client cannot grow the bindings by long ids
    d = s.schedule(req(x_session_id=long_id), pool(1300.0))
    s.committed(d)
    assert s.schedule(req(x_session_id=long_id), busy(pool(1301.0), d.primary)).primary == d.primary
    assert max(len(k) for k in s.profile.scorers[1][0].bindings) <= 64  # type: ignore[attr-defined]
    two = build("{strategy: session_id, sessionIdConfig: {sources: [{header: x-user}, {header: x-session-id}]}}")
    d = two.schedule(req(x_user="u1", x_session_id="s"), pool())
    two.committed(d)
    assert two.schedule(req(x_user="u1"), busy(pool(), d.primary)).primary == d.primary  # x-user wins


@pytest.mark.parametrize(("params", "error"), [
    ("{strategy: sticky}", r"strategy: must be one of encoded_endpoint_header, session_id"),
    ("{profileName: prefill}", r"profileName: not supported by epp"),
    ("{sessionIdConfig: {}}", r"sessionIdConfig: is only read with strategy session_id"),
    ("{strategy: session_id, encodedEndpointHeaderConfig: {}}",
     r"encodedEndpointHeaderConfig: is only read with strategy encoded_endpoint_header"),
    ("{strategy: session_id, sessionIdConfig: {sources: [{attribute: a}]}}",
     r"sources\[0\]\.attribute: not supported by epp"),
    ("{strategy: session_id, sessionIdConfig: {sources: [{}]}}", r"sources\[0\]\.header: required"),
    ("{strategy: session_id, sessionIdConfig: {evictionTtlSeconds: 0}}", r"evictionTtlSeconds: must be >="),
    ("{encodedEndpointHeaderConfig: {heder: x}}", r"encodedEndpointHeaderConfig\.heder: unknown parameter"),
])
def test_parameters_are_strict(params: str, error: str) -> None:
    with pytest.raises(ConfigError, match=error):
        parse_config(doc(params))


def test_discovered_endpoints_get_the_references_namespace_name_tokens_and_either_form_is_read() -> None:
    s = build()
    named = Snapshot(tuple(replace(e, name=f"ns/pod-{i}-rank-0") for i, e in enumerate(pool().endpoints)),
                     {}, {}, 1000.0, 2.0)
    first = s.schedule(req(), named)
    s.committed(first)
    token = dict(s.response_headers(first, first.primary))["x-session-token"]
    name = next(e.name for e in named.endpoints if e.address == first.primary)
    assert base64.b64decode(token).decode() == name  # what the reference writes: a token it reads too
    assert s.schedule(req(x_session_token=token), busy(named, first.primary)).primary == first.primary
    by_address = base64.b64encode(first.primary.encode()).decode()  # a token epp wrote before discovery
    assert s.schedule(req(x_session_token=by_address), busy(named, first.primary)).primary == first.primary
