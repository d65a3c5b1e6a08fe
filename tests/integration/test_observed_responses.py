"""--observed-responses through a real Envoy (envoy/epp-observed.yaml): the pick filter answers the
request, observer filters in observability_mode bring epp the response's first bytes and its end;
the client gets the pod's stream untouched, epp's in-flight count ends with the response (not with
the pick stream), every stream's first bytes and a sample of streams read to their end teach the
latency model, the others not read past their first bytes, and a gateway without the observers is noticed."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import aiohttp
import orjson
import pytest

from epp.scheduling.latency import PredictedLatencyProducer
from epp.sim.profiles import profile
from epp.stack.local import Stack, in_process_stack, wait_until

from .conftest import ONE_STREAM_PER_CONNECTION

CONFIG = (Path(__file__).resolve().parents[1] / "fixtures" / "latency-config.yaml").read_text()
OBSERVED = {"observed_responses": True}
TOKENS = 40
PARAMS = profile("h100-llama8b")


def sample_value(stack: Stack, name: str, **labels: str) -> float:
    assert stack.picker is not None
    value = stack.picker.metrics.registry.get_sample_value(name, labels)
    return value or 0.0


def inflight(stack: Stack) -> int:
    assert stack.picker is not None
    return sum(stack.picker.store.inflight.values())


async def stream_through(stack: Stack, s: aiohttp.ClientSession, usage: bool = True, tokens: int = TOKENS
                         ) -> tuple[int, bytes, int]:
    """One streamed chat request: status, body as the client got it, and epp's in-flight count
    halfway through the stream."""
    model = stack.fleet.servers[0].params.names()[0]
    req = {"model": model, "messages": [{"role": "user", "content": "tell me a story"}],
           "max_tokens": tokens, "ignore_eos": True, "stream": True}
    if usage:
        req["stream_options"] = {"include_usage": True}
    mid = -1
    async with s.post(f"{stack.url}/v1/chat/completions", data=orjson.dumps(req),
                      headers={"content-type": "application/json"}) as r:
        buf = b""
        async for chunk in r.content.iter_any():
            buf += chunk
            if mid < 0 and buf.count(b"data: ") >= tokens // 2:
                mid = inflight(stack)
        return r.status, buf, mid


async def released(stack: Stack) -> None:
    async def zero() -> bool:
        return inflight(stack) == 0
    await wait_until(zero, 5, "the request's in-flight count released")


@pytest.mark.timeout(120)
async def test_streams_pass_untouched_and_end_their_in_flight_count_with_the_response() -> None:
    async with in_process_stack(servers=2, params=PARAMS, template="epp-observed", serve=OBSERVED) as stack, \
            aiohttp.ClientSession() as s:
        for usage in (True, False):
            status, body, mid = await stream_through(stack, s, usage)
            assert status == 200
            events = [e for e in body.split(b"\n\n") if e.startswith(b"data: ")]
            assert events[-1] == b"data: [DONE]"
            assert len([e for e in events if b'"content"' in e]) >= TOKENS - 1
            # Only what the client asked for: epp cannot cut usage out of an observed stream, so it asks none.
            assert (b'"usage"' in body) is usage
            assert mid == 1  # the pick stream ended long before: the observer's end of stream ends the request
            await released(stack)
        assert sample_value(stack, "epp_observed_picks_total", outcome="attached") == 2
        assert sample_value(stack, "epp_observed_picks_total", outcome="unclaimed") == 0
        # epp ended the observer streams with their responses: Envoy would hold them for 5 s.
        assert stack.picker is not None
        picker = stack.picker

        async def no_streams() -> bool:
            return picker.grpc.server.open_streams() == 0
        await wait_until(no_streams, 2, "the observer streams ended")


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("sample", "read"), [(1.0, 6), (0.5, 3), (0.0, 0)])
async def test_the_latency_model_learns_from_the_sampled_streams_read_to_their_end(sample: float, read: int) -> None:
    async with in_process_stack(servers=2, params=PARAMS, template="epp-observed", config_text=CONFIG,
                                serve={**OBSERVED, "observed_usage_sample": sample}) as stack, \
            aiohttp.ClientSession() as s:
        for _ in range(6):
            status, _body, _mid = await stream_through(stack, s, usage=True, tokens=8)
            assert status == 200
            await released(stack)
        assert stack.picker is not None
        async with s.get(f"http://127.0.0.1:{stack.picker.bound_ports['metrics']}/metrics") as r:
            page = await r.text()
        # Every stream's first bytes taught the TTFT fit; the sampled ones also reported their usage
        # (the TPOT fit needs the token count), the others ended at their first bytes (no chunk gap
        # measured), and every one released its in-flight count at its end.
        samples = [line for line in page.splitlines() if line.startswith("epp_latency_prediction_samples_total")]
        assert samples and float(samples[0].rsplit(" ", 1)[1]) == 6.0, samples
        producer = next(p for p in stack.picker.director.scheduler.plugins()
                        if isinstance(p, PredictedLatencyProducer))
        assert sum(f.tpot.n for f in producer.model.pods.values()) == read
        itl = sum(float(line.rsplit(" ", 1)[1]) for line in page.splitlines()
                  if line.startswith("llm_d_epp_request_streaming_itl_seconds_count"))
        assert (itl > 0) == (read > 0)


@pytest.mark.timeout(120)
async def test_a_client_that_leaves_mid_stream_ends_the_request() -> None:
    async with in_process_stack(servers=1, params=PARAMS, template="epp-observed", serve=OBSERVED) as stack:
        model = stack.fleet.servers[0].params.names()[0]
        req = orjson.dumps({"model": model, "prompt": "go on", "max_tokens": 2000, "ignore_eos": True, "stream": True})
        async with aiohttp.ClientSession() as s, s.post(f"{stack.url}/v1/completions", data=req,
                                                        headers={"content-type": "application/json"}) as r:
            async for _chunk in r.content.iter_any():
                if inflight(stack) == 1:
                    break
        await released(stack)
        assert sample_value(stack, "epp_observed_picks_total", outcome="attached") == 1


@pytest.mark.timeout(120)
@pytest.mark.parametrize("workers", [0, 2])
async def test_a_gateway_without_the_observer_is_noticed_and_nothing_stays_in_flight(
        caplog: pytest.LogCaptureFixture, workers: int) -> None:
    # The pick filter alone (the full-duplex bootstrap without response bodies): no observer claims the picks.
    no_observer = {"processing_mode": {"response_body_mode": "NONE", "response_trailer_mode": "SKIP"}}
    async with in_process_stack(servers=1, params=PARAMS, template="epp-full-duplex", ext_proc=no_observer,
                                serve={**OBSERVED, "workers": workers}) as stack, aiohttp.ClientSession() as s:
        assert stack.picker is not None and stack.picker.observed is not None
        stack.picker.observed.attach_timeout = 0.5
        status, _body, _mid = await stream_through(stack, s, tokens=4)
        assert status == 200
        await wait_until(lambda: asyncio.sleep(0, inflight(stack) == 0), 5, "the unclaimed pick finished")
        assert sample_value(stack, "epp_observed_picks_total", outcome="unclaimed") == 1
        assert "no observer stream claimed the end of a pick" in caplog.text
        if stack.picker.workers is not None:  # the pick stream handed it over: nothing held on its link
            assert not any(link.routed for link in stack.picker.workers.links)




@pytest.mark.timeout(120)
@pytest.mark.parametrize("sample", [1.0, 0.0])
async def test_observers_on_any_worker_find_their_pick_in_the_one_state(sample: float) -> None:
    """Two workers: each observer stream claims its pick in the serving process through its own
    worker's link; the first bytes, the usage (read to the end when sampled) and the end reach
    the one state whichever worker read them, and nothing is left held anywhere."""
    requests = 12
    async with in_process_stack(servers=2, params=PARAMS, template="epp-observed", config_text=CONFIG,
                                epp_cluster=ONE_STREAM_PER_CONNECTION,
                                serve={**OBSERVED, "workers": 2, "observed_usage_sample": sample}) as stack, \
            aiohttp.ClientSession() as s:
        picker = stack.picker
        assert picker is not None and picker.workers is not None
        links = picker.workers.links
        assert len(links) == 2
        for _ in range(requests):
            status, body, mid = await stream_through(stack, s, usage=True, tokens=8)
            assert status == 200
            assert body.endswith(b"data: [DONE]\n\n") and b'"usage"' in body
            assert mid == 1  # held by its observers, not by the pick stream (which ended at the headers)
            await released(stack)
        assert sample_value(stack, "epp_observed_picks_total", outcome="attached") == requests
        assert sample_value(stack, "epp_observed_picks_total", outcome="unclaimed") == 0
        assert sum(link.claims for link in links) == 2 * requests  # a first and an end observer each
        assert all(link.requests > 0 and link.claims > 0 for link in links)  # both workers picked and observed

        async def nothing_held() -> bool:  # (the pick streams' and first observers' last words may trail the end)
            return not any(link.routed or link.pending for link in links)
        await wait_until(nothing_held, 2, "nothing held for the streams that ended")
        producer = next(p for p in picker.director.scheduler.plugins() if isinstance(p, PredictedLatencyProducer))
        # Every stream's first bytes taught the TTFT fit; the TPOT fit needs the usage of those read to the end.
        assert producer.errors.samples == requests
        assert sum(f.tpot.n for f in producer.model.pods.values()) == (requests if sample else 0)


def test_observed_responses_keep_the_default_worker_processes() -> None:
    from epp.cli import _worker_count, build_parser
    from epp.server.workers import default_workers

    args = build_parser().parse_args(["serve", "--observed-responses", "--grpc-port", "9002", "--endpoints", "a:1"])
    assert _worker_count(args) == default_workers()


@pytest.mark.timeout(120)
async def test_a_killed_worker_holding_observers_cuts_no_stream_and_leaves_nothing_counted() -> None:
    """Observed streams do not depend on epp once routed: a worker killed while it holds observer
    streams cuts none of them (the observers fail open); what it held is finished in the one
    state, and the worker is replaced."""
    async with in_process_stack(servers=2, params=PARAMS, template="epp-observed",
                                epp_cluster=ONE_STREAM_PER_CONNECTION,
                                serve={**OBSERVED, "workers": 2}) as stack, aiohttp.ClientSession() as s:
        picker = stack.picker
        assert picker is not None and picker.workers is not None
        workers = picker.workers
        streams = [asyncio.create_task(stream_through(stack, s, usage=False, tokens=400)) for _ in range(4)]

        async def observing() -> bool:  # four requests in flight, their pick streams done with them
            return inflight(stack) == 4 and sum(len(link.routed) for link in workers.links) == 4

        await wait_until(observing, 10, "the end observers of four requests in flight")
        victim = next(link for link in workers.links if link.routed)  # it holds end observers
        os.kill(victim.pid, signal.SIGKILL)
        results = await asyncio.gather(*streams)
        for status, body, _mid in results:
            assert status == 200 and body.endswith(b"data: [DONE]\n\n")  # every stream whole
        await released(stack)

        async def replaced() -> bool:
            return len(workers.links) == 2 and victim.pid not in workers.pids()

        await wait_until(replaced, 10, "the worker started again and linked")
        assert not any(link.routed or link.pending for link in workers.links)
