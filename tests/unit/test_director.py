"""The director: one request's life, the same for ext_proc and the Pick API."""

from __future__ import annotations

import orjson
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from epp.config import parse_config, precise_config
from epp.datastore.endpoint import EngineSignals
from epp.datastore.store import Datastore
from epp.observability.metrics import PickerMetrics
from epp.requestcontrol.director import Director
from epp.requestcontrol.refused import Refused
from epp.requestcontrol.routed import RequestInput, ResponseAccess
from epp.scheduling.precise_scorer import PrecisePrefixCacheScorer
from epp.scheduling.prefill_load import PrefillLoadScorer
from epp.server.extproc import ExtProcStream
from epp.server.pickapi import PickAPI
from epp.v1 import picker_pb2

PREFILL = """
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: prefill-load-scorer
- type: prefix-cache-scorer
schedulingProfiles:
- name: default
  plugins:
  - {pluginRef: prefill-load-scorer, weight: 5}
  - {pluginRef: prefix-cache-scorer, weight: 3}
"""
USAGE_TAIL = b'data: {"choices":[],"usage":{"prompt_tokens":90,"prompt_tokens_details":{"cached_tokens":64}}}\n\n' \
             b"data: [DONE]\n\n"


def director(text: str = PREFILL, n: int = 2) -> Director:
    store = Datastore()
    store.set_endpoints([f"10.0.0.{i}:8000" for i in range(n)])
    for a in store.addresses():
        store.record_scrape(a, EngineSignals(), 0)
    scheduler, _ = parse_config(text).build()
    return Director(store, scheduler, PickerMetrics(store))


def errors(d: Director, code: str) -> float:
    value = d.metrics.sample_value(
        "inference_objective_request_error_total", {"model_name": "", "target_model_name": "", "error_code": code})
    return value or 0.0


def one(d: Director, kind: type) -> object:
    return next(s for s, _ in d.scheduler.profile.scorers if isinstance(s, kind))


def test_the_pick_api_ends_the_prefill_at_response_started_as_ext_proc_does_at_first_bytes() -> None:
    d = director()
    scorer = one(d, PrefillLoadScorer)
    assert isinstance(scorer, PrefillLoadScorer)
    api = PickAPI(d)
    resp = api.pick(picker_pb2.PickRequest(model="m", prompt="words " * 800))
    assert sum(scorer.pending.values()) == 1200 and sum(d.store.inflight.values()) == 1
    assert api.response_started(picker_pb2.ResponseStartedRequest(pick_id=resp.pick_id)).known
    assert scorer.pending == {} and sum(d.store.inflight.values()) == 1  # prefilled, still in flight
    assert api.release(picker_pb2.ReleaseRequest(pick_id=resp.pick_id)).released
    assert sum(d.store.inflight.values()) == 0
    assert not api.response_started(picker_pb2.ResponseStartedRequest(pick_id=resp.pick_id)).known


def test_a_release_with_the_response_tail_feeds_the_closed_loop_like_a_response_through_ext_proc() -> None:
    body = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "hello " * 60}], "stream": True})
    for front in ("pick-api", "ext_proc"):
        d = director(precise_config("sim", "tcp://127.0.0.1:1"))
        sc = one(d, PrecisePrefixCacheScorer)
        assert isinstance(sc, PrecisePrefixCacheScorer)
        if front == "pick-api":
            api = PickAPI(d)
            resp = api.pick(picker_pb2.PickRequest(body=body, path="/v1/chat/completions"))
            api.release(picker_pb2.ReleaseRequest(pick_id=resp.pick_id, response_tail=USAGE_TAIL))
        else:
            s = ExtProcStream(d)
            h = pb.ProcessingRequest(request_headers=pb.HttpHeaders())
            h.request_headers.headers.headers.add(key=":path", raw_value=b"/v1/chat/completions")
            h.protocol_config.request_body_mode = 4
            h.protocol_config.response_body_mode = 4
            s.on_message(h)
            s.on_message(pb.ProcessingRequest(request_body=pb.HttpBody(body=body, end_of_stream=True)))
            s.on_message(pb.ProcessingRequest(response_body=pb.HttpBody(body=USAGE_TAIL, end_of_stream=True)))
        assert sc.tracker.totals.samples == 1 and sc.tracker.totals.actual_tokens == 64, front
        assert sum(d.store.inflight.values()) == 0


def test_refusals_are_counted_and_mapped_the_same_way_for_every_front_end() -> None:
    d = director()
    api = PickAPI(d)
    with pytest.raises(Refused) as e:
        d.route(RequestInput({}, "/v1/completions", b"{nope"))
    assert e.value.status == 400 and e.value.grpc_code == 3 and orjson.loads(e.value.body())["error"]["code"] == 400
    from epp.server.pickapi import PickFailed

    with pytest.raises(PickFailed) as failed:
        api.pick(picker_pb2.PickRequest(body=b"{nope", path="/v1/completions"))
    assert failed.value.code == 3
    assert errors(d, "400") == 2
    empty = Director(Datastore(), d.scheduler, d.metrics)
    with pytest.raises(Refused) as e:
        empty.route(RequestInput({}, "/v1/completions", model="m", prompt="x"))
    assert (e.value.status, e.value.grpc_code, e.value.err_type) == (503, 14, "ServiceUnavailableError")


def test_only_a_front_end_that_forwards_the_body_gets_usage_injected() -> None:
    d = director(precise_config("sim", "tcp://127.0.0.1:1"))
    body = orjson.dumps({"model": "m", "prompt": "hi " * 40, "stream": True})
    injected = d.route(RequestInput({}, "/v1/completions", body), ResponseAccess.INJECT)
    assert injected.reader is not None and injected.reader.strip
    assert orjson.loads(injected.forward_body or b"{}")["stream_options"] == {"include_usage": True}
    read = d.route(RequestInput({}, "/v1/completions", body), ResponseAccess.READ)
    assert read.reader is not None and not read.reader.strip and read.forward_body is None
    blind = d.route(RequestInput({}, "/v1/completions", body), ResponseAccess.NONE)
    assert blind.reader is None and blind.forward_body is None


# -- the token producer's fetch, before admission ---------------------------------------------------
async def test_a_request_waits_for_its_token_ids_then_is_scheduled_with_them() -> None:
    import asyncio

    from epp.requestcontrol.pending import Pending
    from epp.sim.profiles import profile
    from epp.sim.server import SimServer
    from epp.stack.local import free_port

    sim = SimServer(free_port(), profile("fast"))
    await sim.start()
    try:
        text = f"""apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: token-producer
  parameters: {{modelName: {sim.params.names()[0]}, vllm: {{url: "http://{sim.address}"}}}}
- type: precise-prefix-cache-producer
- type: prefix-cache-scorer
schedulingProfiles:
- name: default
  plugins: [{{pluginRef: prefix-cache-scorer}}]
"""
        cfg = parse_config(text)
        scheduler, instances = cfg.build()
        d = director()
        d.scheduler = scheduler
        d.tokens = cfg.runtime(instances).tokens
        model = sim.params.names()[0]
        body = orjson.dumps({"model": model, "messages": [{"role": "user", "content": "hi " * 40}]})
        got: list[object] = []
        out = d.submit(RequestInput({}, "/v1/chat/completions", body), ResponseAccess.READ, got.append)
        assert isinstance(out, Pending) and not got  # rendering: nothing decided yet
        for _ in range(200):
            if got:
                break
            await asyncio.sleep(0.01)
        routed = got[0]
        assert not isinstance(routed, Refused)
        assert routed.request.token_ids and routed.request.real_tokens  # type: ignore[attr-defined]
        routed.finish()  # type: ignore[attr-defined]
        cancelled: list[object] = []
        out = d.submit(RequestInput({}, "/v1/chat/completions", body.replace(b"hi", b"yo")), ResponseAccess.READ,
                       cancelled.append)
        assert isinstance(out, Pending)
        out.cancel()  # the client went away while its ids were fetched
        await asyncio.sleep(0.2)
        assert not cancelled and not any(d.store.snapshot().inflight.values())
        api = PickAPI(d)
        held = api.pick(picker_pb2.PickRequest(path="/v1/chat/completions", body=body.replace(b"hi", b"ok")))
        answers: list[object] = []
        held.wait(answers.append, deadline=5.0)
        for _ in range(200):
            if answers:
                break
            await asyncio.sleep(0.01)
        assert isinstance(answers[0], picker_pb2.PickResponse) and answers[0].endpoint
        again = api.pick(picker_pb2.PickRequest(path="/v1/chat/completions", body=body))  # its ids are cached
        assert isinstance(again, picker_pb2.PickResponse)
    finally:
        if d.tokens is not None:
            await d.tokens.close()  # type: ignore[attr-defined]
        await sim.stop()
