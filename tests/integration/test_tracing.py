"""--tracing: one OpenTelemetry span per request, exported over OTLP/gRPC to a collector (here a
small one in the test), child of the request's traceparent, as the reference's."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from epp.stack.local import free_ports, in_process_stack

from .conftest import completion_body

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"


class Collector(trace_service_pb2_grpc.TraceServiceServicer):  # type: ignore[misc]
    def __init__(self) -> None:
        self.spans: list[tuple[dict[str, str], object]] = []

    async def Export(self, request: trace_service_pb2.ExportTraceServiceRequest, context: object
                     ) -> trace_service_pb2.ExportTraceServiceResponse:
        for rs in request.resource_spans:
            resource = {a.key: a.value.string_value for a in rs.resource.attributes}
            for ss in rs.scope_spans:
                for span in ss.spans:
                    self.spans.append((resource, span))
        return trace_service_pb2.ExportTraceServiceResponse()


async def test_requests_are_traced_to_an_otlp_collector(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (port,) = free_ports(1)
    collector = Collector()
    server = grpc.aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    for key, value in {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
                       "OTEL_EXPORTER_OTLP_INSECURE": "true", "OTEL_TRACES_SAMPLER_ARG": "1.0",
                       "OTEL_SERVICE_NAME": "epp-under-test"}.items():
        monkeypatch.setenv(key, value)
    try:
        async with in_process_stack(servers=2, serve={"tracing": True}) as stack, aiohttp.ClientSession() as s:
            headers = {"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01", "content-type": "application/json"}
            async with s.post(f"{stack.url}/v1/completions", data=completion_body("traced"), headers=headers) as r:
                assert r.status == 200
            async with s.post(f"{stack.url}/v1/completions", data=b"{bad", headers=headers) as r:
                assert r.status == 400
        # The stack's stop flushed the batch.
        spans = [(res, sp) for res, sp in collector.spans if sp.name == "gateway.request_orchestration"]
        assert len(spans) == 2
        (resource, ok), (_, bad) = spans
        assert resource["service.name"] == "epp-under-test"
        assert ok.trace_id.hex() == TRACE_ID and ok.parent_span_id.hex() == PARENT_ID
        assert ok.kind == ok.SPAN_KIND_SERVER
        attrs = {a.key: a.value for a in ok.attributes}
        assert attrs["target_model"].string_value == "sim-model" and attrs["request_prio"].int_value == 0
        assert bad.status.code == bad.status.STATUS_CODE_ERROR and "JSON" in bad.status.message
    finally:
        await server.stop(0.5)


def test_sampler_and_exporter_from_the_environment(caplog: pytest.LogCaptureFixture) -> None:
    from epp.observability.tracing import Tracing

    t = Tracing({"OTEL_TRACES_SAMPLER": "always_on"})  # unsupported: logged, the default ratio used
    assert "unsupported sampler type: always_on" in caplog.text
    assert "0.1" in t.provider.sampler.get_description()
    t.shutdown()
    t = Tracing({"OTEL_TRACES_SAMPLER_ARG": "0.5"})
    assert "0.5" in t.provider.sampler.get_description()
    t.shutdown()
