"""OpenTelemetry tracing (--tracing), set up from the standard OTEL_* environment as the reference does.

- ``OTEL_TRACES_EXPORTER``: ``console`` (the default, as the reference: spans on stdout) or
  ``otlp`` (gRPC to ``OTEL_EXPORTER_OTLP_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``,
  default ``localhost:4317``, insecure unless told otherwise).
- ``OTEL_TRACES_SAMPLER``: ``parentbased_traceidratio`` with ``OTEL_TRACES_SAMPLER_ARG`` (0.1 by
  default); another sampler is logged and the default used, as the reference does.
- ``OTEL_SERVICE_NAME`` / ``OTEL_RESOURCE_ATTRIBUTES`` (default service ``llm-d-epp``).

One span per request, ``gateway.request_orchestration`` (kind SERVER), from its arrival to the
pick (or refusal, with an error status), child of the request's ``traceparent`` (W3C trace
context and baggage), with the attributes ``target_model`` and ``request_prio``. Nothing global
is set (no global provider, no current-span context): the director gets this object. The SDK is
imported only when tracing is on.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

log = logging.getLogger("epp.tracing")

SERVICE_NAME = "llm-d-epp"
SPAN_NAME = "gateway.request_orchestration"


class Tracing:
    """A tracer provider of its own, and the request span."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        from opentelemetry.baggage.propagation import W3CBaggagePropagator
        from opentelemetry.propagators.composite import CompositePropagator
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
        from opentelemetry.trace import SpanKind, Status, StatusCode
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        env = os.environ if environ is None else environ
        sampler_name = env.get("OTEL_TRACES_SAMPLER", "parentbased_traceidratio")
        try:
            ratio = float(env.get("OTEL_TRACES_SAMPLER_ARG", "0.1"))
        except ValueError:
            ratio = 0.1
        if sampler_name != "parentbased_traceidratio":
            log.error("unsupported sampler type: %s, fallback to parentbased_traceidratio with 0.1 ratio",
                      sampler_name)
            ratio = 0.1
        exporter: SpanExporter
        kind = env.get("OTEL_TRACES_EXPORTER", "console")
        if kind == "otlp":
            try:
                from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
            except ImportError as e:  # xds-protos' older copy of the OpenTelemetry protos won the install
                raise ValueError(f"--tracing: the OTLP exporter cannot load ({e}); reinstall opentelemetry-proto "
                                 "(pip install --force-reinstall --no-deps opentelemetry-proto)") from None

            given = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
            exporter = OTLPSpanExporter() if given else OTLPSpanExporter(endpoint="localhost:4317", insecure=True)
        else:
            exporter = ConsoleSpanExporter()
        log.info("tracing on: exporter %s, parent-based trace-id ratio %g", kind, ratio)
        resource = Resource.create({"service.name": env.get("OTEL_SERVICE_NAME") or SERVICE_NAME})
        self.provider = TracerProvider(sampler=ParentBased(TraceIdRatioBased(ratio)), resource=resource)
        self.provider.add_span_processor(BatchSpanProcessor(exporter))
        self.tracer = self.provider.get_tracer("epp.requestcontrol")
        self.propagator = CompositePropagator([TraceContextTextMapPropagator(), W3CBaggagePropagator()])
        self._server = SpanKind.SERVER
        self._error = Status(StatusCode.ERROR)
        self._status = Status

    def start(self, headers: Mapping[str, str]) -> Any:
        """The span of one request's orchestration, child of its traceparent (``end`` it)."""
        return self.tracer.start_span(SPAN_NAME, context=self.propagator.extract(carrier=headers), kind=self._server)

    def failed(self, span: Any, message: str) -> None:
        span.set_status(self._status(self._error.status_code, message))

    def shutdown(self) -> None:
        """Export what is buffered, then stop."""
        self.provider.shutdown()
