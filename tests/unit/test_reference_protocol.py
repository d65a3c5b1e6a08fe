"""The reference's protocol keys: header names and aliases, the subset hint, the served endpoint,
per-endpoint scores, policies in both API groups, the pool-level health service."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from epp.config import load_config
from epp.datastore.endpoint import EngineSignals
from epp.datastore.kubernetes import pod_endpoints
from epp.datastore.store import Datastore
from epp.observability.metrics import PickerMetrics
from epp.requestcontrol.director import Director
from epp.requestcontrol.headers import OBJECTIVE, header
from epp.requestcontrol.policies import RequestPolicies
from epp.requestcontrol.routed import RequestInput
from epp.server.extproc import ExtProcStream
from epp.server.health import NOT_SERVING, SERVING
from epp.server.readiness import Readiness

ADDRS = [f"10.0.0.{i}:8000" for i in range(4)]
BODY = orjson.dumps({"model": "food", "prompt": "hello world " * 10})


def director(**kw: Any) -> Director:
    store = Datastore()
    store.set_endpoints(ADDRS)
    for a in ADDRS:
        store.record_scrape(a, EngineSignals(), 0)
    scheduler, _ = load_config(None).build()
    return Director(store, scheduler, PickerMetrics(store), **kw)


def request_headers(subset: list[Any] | None = None, extra: dict[str, str] | None = None) -> pb.ProcessingRequest:
    h = pb.HttpHeaders()
    for k, v in {":path": "/v1/completions", **(extra or {})}.items():
        h.headers.headers.add(key=k, raw_value=v.encode())
    msg = pb.ProcessingRequest(request_headers=h)
    msg.protocol_config.request_body_mode = 4
    msg.protocol_config.response_body_mode = 4
    if subset is not None:
        hint = msg.metadata_context.filter_metadata["envoy.lb.subset_hint"]
        value = hint.fields["x-gateway-destination-endpoint-subset"]
        value.list_value.SetInParent()  # an empty list is still a list
        value.list_value.extend(subset)
    return msg


def pick(d: Director, subset: list[Any] | None = None, emit_scores: bool = False,
         extra: dict[str, str] | None = None) -> tuple[ExtProcStream, pb.ProcessingResponse]:
    s = ExtProcStream(d, emit_scores=emit_scores)
    s.on_message(request_headers(subset, extra))
    out = s.on_message(pb.ProcessingRequest(request_body=pb.HttpBody(body=BODY, end_of_stream=True)))
    return s, pb.ProcessingResponse.FromString(out[0])


def chosen(resp: pb.ProcessingResponse) -> str:
    return resp.dynamic_metadata.fields["envoy.lb"].struct_value.fields["x-gateway-destination-endpoint"].string_value


def test_the_subset_hint_restricts_the_pick_by_host() -> None:
    d = director()
    for _ in range(8):  # ports differ in the hint: the reference matches hosts
        assert chosen(pick(d, ["10.0.0.2:9999", "10.0.0.3:8000"])[1]) in ("10.0.0.2:8000", "10.0.0.3:8000")
    _, resp = pick(d, [])
    assert resp.immediate_response.status.code == 503 and b"subset hint" in resp.immediate_response.body
    _, resp = pick(d, ["10.9.9.9:8000"])
    assert resp.immediate_response.status.code == 503
    assert chosen(pick(d, None)[1]) in ADDRS  # no hint: the whole pool
    ignoring = director(subset_filter=False)  # --disable-endpoint-subset-filter
    assert chosen(pick(ignoring, [])[1]) in ADDRS
    assert sum(d.store.inflight.values()) == 9  # 8 + 1 picks; the refused ones hold nothing


def test_emit_endpoint_scores_adds_the_picked_endpoints_scores() -> None:
    d = director()
    _, resp = pick(d, emit_scores=True)
    lb = resp.dynamic_metadata.fields["envoy.lb"].struct_value.fields
    scores = lb["x-gateway-destination-endpoint-scores"].struct_value.fields
    assert list(scores) == [chosen(resp)] and scores[chosen(resp)].number_value > 0
    _, plain = pick(d)
    assert "x-gateway-destination-endpoint-scores" not in plain.dynamic_metadata.fields["envoy.lb"].struct_value.fields


def test_the_served_endpoint_takes_over_the_in_flight_count() -> None:
    d = director()
    s, resp = pick(d)
    first = chosen(resp)
    other = next(a for a in ADDRS if a != first)
    msg = pb.ProcessingRequest(response_headers=pb.HttpHeaders())
    served = msg.metadata_context.filter_metadata["envoy.lb"].fields["x-gateway-destination-endpoint-served"]
    served.string_value = other
    s.on_message(msg)
    assert d.store.inflight[first] == 0 and d.store.inflight[other] == 1
    s.on_message(pb.ProcessingRequest(response_body=pb.HttpBody(end_of_stream=True)))
    assert sum(d.store.inflight.values()) == 0
    s2, resp2 = pick(d)  # an address outside the pool changes nothing
    served.string_value = "10.9.9.9:1"
    s2.on_message(msg)
    assert d.store.inflight[chosen(resp2)] == 1


def test_headers_are_read_by_the_current_name_then_the_old_one() -> None:
    assert header({"x-gateway-inference-objective": "old"}, OBJECTIVE) == "old"
    assert header({"x-gateway-inference-objective": "old", "x-llm-d-inference-objective": "new"}, OBJECTIVE) == "new"
    assert header({}, OBJECTIVE) == ""


def test_objective_and_model_rewrite_headers_new_and_old() -> None:
    policies = RequestPolicies.build([
        {"kind": "InferenceObjective", "metadata": {"name": "batch"}, "spec": {"priority": -3}},
        {"kind": "InferenceModelRewrite", "metadata": {"name": "r"},
         "spec": {"rules": [{"matches": [{"model": {"value": "alias"}}], "targets": [{"modelRewrite": "v2"}]}]}}],
        pool=None)
    d = director(policies=policies)
    for name in ("x-llm-d-inference-objective", "x-gateway-inference-objective"):
        routed = d.route(RequestInput({name: "batch"}, "/v1/completions", BODY))
        assert routed.request.priority == -3
    for name in ("x-llm-d-model-name-rewrite", "x-gateway-model-name-rewrite"):
        routed = d.route(RequestInput({name: "food-v3"}, "/v1/completions", BODY))
        assert routed.request.target_model == "food-v3"
        assert orjson.loads(routed.forward_body or b"{}")["model"] == "food-v3"
    # A rewrite rule for the model overrides the header, as in the reference.
    alias = orjson.dumps({"model": "alias", "prompt": "x"})
    assert d.route(RequestInput({"x-llm-d-model-name-rewrite": "other"}, "/v1/completions", alias)
                   ).request.target_model == "v2"


def test_policies_match_the_pool_by_name_group_and_kind() -> None:
    def objective(name: str, ref: dict[str, str]) -> dict[str, Any]:
        return {"apiVersion": "llm-d.ai/v1alpha2", "kind": "InferenceObjective", "metadata": {"name": name},
                "spec": {"priority": 5, "poolRef": ref}}

    objs = [objective("default-group", {"name": "p"}),
            objective("explicit", {"name": "p", "group": "inference.networking.k8s.io", "kind": "InferencePool"}),
            objective("other-group", {"name": "p", "group": "inference.networking.x-k8s.io"}),
            objective("other-kind", {"name": "p", "kind": "Service"}),
            objective("other-pool", {"name": "q"})]
    assert set(RequestPolicies.build(objs, "p").objectives) == {"default-group", "explicit"}
    assert set(RequestPolicies.build(objs, "p", pool_group="inference.networking.x-k8s.io").objectives) == {
        "other-group"}


def test_active_ports_annotation_current_and_old_names() -> None:
    def pod(annotations: dict[str, str]) -> dict[str, Any]:
        return {"metadata": {"name": "a", "annotations": annotations},
                "status": {"podIP": "10.1.1.1", "conditions": [{"type": "Ready", "status": "True"}]}}

    assert pod_endpoints(pod({"llm-d.ai/active-ports": "8001"}), (8000, 8001)) == ["10.1.1.1:8001"]
    assert pod_endpoints(pod({"inference.networking.k8s.io/active-ports": "8000"}), (8000, 8001)) == [
        "10.1.1.1:8000"]
    assert pod_endpoints(pod({"llm-d.ai/active-ports": "8001", "inference.networking.k8s.io/active-ports": "8000"}),
                         (8000, 8001)) == ["10.1.1.1:8001"]


@pytest.mark.parametrize(("fresh", "leader", "synced", "draining", "ready", "pool"), [
    (True, True, True, False, SERVING, SERVING),
    (False, True, True, False, NOT_SERVING, SERVING),  # a pool without fresh pods is not restarted
    (False, True, False, False, NOT_SERVING, NOT_SERVING),
    (True, False, True, False, NOT_SERVING, NOT_SERVING),
    (True, True, True, True, NOT_SERVING, NOT_SERVING),
])
def test_inference_extension_health_is_pool_level(fresh: bool, leader: bool, synced: bool, draining: bool,
                                                  ready: int, pool: int) -> None:
    r = Readiness(lambda: fresh, lambda: leader, lambda: synced)
    r.draining = draining
    r.update()
    status = r.health.statuses
    assert status["readiness"] == ready and status[""] == ready
    assert status["inference-extension"] == pool


def _dropped(resp: pb.ProcessingResponse) -> str | None:
    found = [o.header.raw_value.decode() for o in resp.immediate_response.headers.set_headers
             if o.header.key == "x-llm-d-request-dropped-reason"]
    return found[0] if found else None


def test_refusals_before_dispatch_carry_the_references_dropped_reason() -> None:
    d = director()
    _, resp = pick(d, [])
    assert resp.immediate_response.status.code == 503 and _dropped(resp) == "rejected-no-endpoints"
    policies = RequestPolicies.build([{"kind": "InferenceObjective", "metadata": {"name": "batch"},
                                       "spec": {"priority": -1}}], pool=None)
    full = director(policies=policies)
    for a in ADDRS:
        full.store.record_scrape(a, EngineSignals(waiting=100), 0)
    _, resp = pick(full, extra={"x-llm-d-inference-objective": "batch"})
    assert resp.immediate_response.status.code == 429 and _dropped(resp) == "rejected-saturated"
    s = ExtProcStream(d)
    s.on_message(request_headers())
    bad = pb.ProcessingResponse.FromString(
        s.on_message(pb.ProcessingRequest(request_body=pb.HttpBody(body=b"{nope", end_of_stream=True)))[0])
    assert bad.immediate_response.status.code == 400 and _dropped(bad) is None  # not a drop: a bad request
