"""Client trailers through a real Envoy (HTTP/2 cleartext), and epp's own metrics."""

from __future__ import annotations

import asyncio
import struct

import aiohttp
import orjson
from hpack import Decoder, Encoder

from epp.server import h2grpc as h2
from epp.stack.local import in_process_stack

from .conftest import completion_body, sha

REFERENCE_NAMES = (
    "inference_objective_request_total", "inference_objective_request_error_total",
    "inference_objective_request_duration_seconds_bucket", "inference_pool_average_kv_cache_utilization",
    "inference_pool_average_queue_size", "inference_pool_ready_pods", "inference_pool_per_pod_queue_size",
    "inference_extension_scheduler_e2e_duration_seconds_bucket", "inference_extension_plugin_duration_seconds_bucket",
    "epp_metrics_scrape_errors_total", "epp_picker_cpu_seconds_total",
    # The reference's current names (llm-d-router pkg/epp/metrics/llm_d_router_metrics.go at ebab68792),
    # next to the legacy ones above, and the legacy ones epp lacked.
    "llm_d_epp_request_total", "llm_d_epp_request_error_total", "llm_d_epp_request_duration_seconds_bucket",
    "llm_d_epp_request_running", "llm_d_epp_average_kv_cache_utilization", "llm_d_epp_average_queue_size",
    "llm_d_epp_average_running_requests", "llm_d_epp_std_dev_kv_cache_utilization", "llm_d_epp_std_dev_queue_size",
    "llm_d_epp_std_dev_running_requests", "llm_d_epp_ready_endpoints",
    "llm_d_epp_scheduler_e2e_duration_seconds_bucket",
    "llm_d_epp_plugin_duration_seconds_bucket", "inference_objective_running_requests",
    "inference_pool_average_running_requests",
)


async def h2c_post_with_trailers(port: int, path: str, body: bytes) -> tuple[dict[str, str], bytes]:
    """POST over HTTP/2 prior knowledge, ending the request with trailers instead of END_STREAM."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    enc, dec = Encoder(), Decoder()
    head = enc.encode([(":method", "POST"), (":scheme", "http"), (":path", path), (":authority", "localhost"),
                       ("content-type", "application/json"), ("x-test-id", "trailers")])
    trailers = enc.encode([("x-checksum", sha(body))])
    writer.write(h2.PREFACE + h2.frame(h2.SETTINGS, 0, 0) + h2.frame(h2.HEADERS, h2.END_HEADERS, 1, head)
                 + h2.frame(h2.DATA, 0, 1, body) + h2.frame(h2.HEADERS, h2.END_HEADERS | h2.END_STREAM, 1, trailers))
    await writer.drain()
    headers: dict[str, str] = {}
    data = b""
    buf = b""
    while True:
        chunk = await asyncio.wait_for(reader.read(65536), 10)
        if not chunk:
            break
        buf += chunk
        done = False
        while len(buf) >= 9:
            hi, lo, ftype, flags, sid = struct.unpack_from(">BHBBL", buf)
            n = (hi << 16) | lo
            if len(buf) < 9 + n:
                break
            payload, buf = buf[9 : 9 + n], buf[9 + n :]
            if ftype == h2.SETTINGS and not flags & h2.ACK:
                writer.write(h2.frame(h2.SETTINGS, h2.ACK, 0))
            elif ftype == h2.HEADERS and sid == 1:
                headers.update(dict(dec.decode(payload)))
                done = done or bool(flags & h2.END_STREAM)
            elif ftype == h2.DATA and sid == 1:
                data += payload
                done = done or bool(flags & h2.END_STREAM)
        if done:
            break
    writer.close()
    return headers, data


async def test_request_trailers_pass_through_and_the_request_completes() -> None:
    async with in_process_stack(servers=2) as stack:
        body = completion_body("with trailers", max_tokens=2)
        headers, data = await h2c_post_with_trailers(stack.envoy.listen_port, "/v1/completions", body)
        assert headers[":status"] == "200", (headers, data)
        assert orjson.loads(data)["usage"]["completion_tokens"] == 2
        entry = next(e for s in stack.fleet.servers for e in s.request_log
                     if e["headers"].get("x-test-id") == "trailers")
        assert entry["sha256"] == sha(body)


async def test_epp_metrics_use_the_reference_names() -> None:
    async with in_process_stack(servers=2) as stack, aiohttp.ClientSession() as s:
        assert stack.picker is not None
        async with s.post(f"{stack.url}/v1/completions", data=completion_body("count me")) as r:
            assert r.status == 200
        async with s.post(f"{stack.url}/v1/completions", data=b"{bad") as r:
            assert r.status == 400
        async with s.get(f"http://127.0.0.1:{stack.picker.bound_ports['metrics']}/metrics") as r:
            text = await r.text()
        for name in REFERENCE_NAMES:
            family = name.removesuffix("_total").removesuffix("_bucket")
            assert f"# HELP {family}" in text, name  # labelled series appear with their first sample
        assert 'inference_pool_ready_pods{name="default"} 2.0' in text
        legacy = 'inference_objective_request_total{model_name="sim-model",priority="0",target_model_name="sim-model"}'
        assert f"{legacy} 1.0" in text
        assert ('llm_d_epp_request_total{fairness_id="default-flow",model_name="sim-model",priority="0",'
                'target_model_name="sim-model"} 1.0') in text
        assert 'error_code="400"' in text
        # "count me" is shorter than one 64-character block: nothing to index yet.
        assert "inference_extension_prefix_indexer_size 0.0" in text
        async with s.post(f"{stack.url}/v1/completions", data=completion_body("long shared prompt " * 20)) as r:
            assert r.status == 200
        async with s.get(f"http://127.0.0.1:{stack.picker.bound_ports['metrics']}/metrics") as r:
            assert "inference_extension_prefix_indexer_size 5.0" in await r.text()  # 380 chars = 5 blocks
