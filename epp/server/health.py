"""grpc.health.v1 on epp's own HTTP/2 server (Check and Watch).

Kubernetes gRPC probes and gateways call it. It shares the lean server ext_proc uses, so epp
runs one gRPC stack (a grpcio server added its own poller thread).
Check answers NOT_FOUND for an unknown service; Watch sends the current status (SERVICE_UNKNOWN
for an unknown service) and then every change, until the client goes away.
"""

from __future__ import annotations

from grpc_health.v1 import health_pb2

from epp.server import h2grpc

CHECK = "/grpc.health.v1.Health/Check"
WATCH = "/grpc.health.v1.Health/Watch"
NOT_FOUND = 5
MAX_SERVICE_NAME = 256  # bytes; health service names are short identifiers
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


def _response(status: int) -> bytes:
    out: bytes = health_pb2.HealthCheckResponse(status=status).SerializeToString()
    return out


def _service_of(message: bytes) -> str | None:
    """The requested service name; None for a message that is not a short HealthCheckRequest."""
    if len(message) > MAX_SERVICE_NAME + 8:
        return None
    try:
        service: str = health_pb2.HealthCheckRequest.FromString(message).service
    except Exception:
        return None
    return service if len(service) <= MAX_SERVICE_NAME else None


class HealthState:
    """Statuses by service name; ``set`` notifies the open Watch streams."""

    def __init__(self) -> None:
        self.statuses: dict[str, int] = {}
        self._watchers: dict[str, set[h2grpc.Responder]] = {}

    def set(self, service: str, status: int) -> None:
        if self.statuses.get(service) == status:
            return
        self.statuses[service] = status
        for responder in list(self._watchers.get(service, ())):
            responder.send(_response(status))
            responder.flush()

    def h2_services(self) -> dict[str, h2grpc.HandlerFactory]:
        return {CHECK: lambda resp, _h: _Check(self, resp), WATCH: lambda resp, _h: _Watch(self, resp)}

    def watch(self, service: str, responder: h2grpc.Responder) -> None:
        self._watchers.setdefault(service, set()).add(responder)
        responder.send(_response(self.statuses.get(service, SERVICE_UNKNOWN)))

    def unwatch(self, service: str, responder: h2grpc.Responder) -> None:
        watchers = self._watchers.get(service)
        if watchers is not None:
            watchers.discard(responder)
            if not watchers:  # nothing of a closed stream stays behind, its service name included
                del self._watchers[service]

    def watched(self) -> int:
        """Open Watch streams."""
        return sum(len(w) for w in self._watchers.values())


class _Check:
    __slots__ = ("message", "responder", "state")

    def __init__(self, state: HealthState, responder: h2grpc.Responder) -> None:
        self.state = state
        self.responder = responder
        self.message: bytes | None = None

    def on_message(self, message: bytes) -> None:
        self.message = message

    def on_end(self) -> None:
        service = _service_of(self.message or b"")
        if service is None:
            self.responder.finish(h2grpc.INVALID_ARGUMENT, "cannot parse HealthCheckRequest")
        elif service not in self.state.statuses:
            self.responder.finish(NOT_FOUND, f"unknown service {service!r}")
        else:
            self.responder.send(_response(self.state.statuses[service]))
            self.responder.finish()

    def on_reset(self) -> None:
        pass


class _Watch:
    __slots__ = ("responder", "service", "state")

    def __init__(self, state: HealthState, responder: h2grpc.Responder) -> None:
        self.state = state
        self.responder = responder
        self.service: str | None = None

    def on_message(self, message: bytes) -> None:
        service = _service_of(message)
        if service is None:
            self.responder.finish(h2grpc.INVALID_ARGUMENT, "cannot parse HealthCheckRequest")
            self.on_reset()
            return
        if self.service is None:
            self.service = service
            self.state.watch(service, self.responder)

    def on_end(self) -> None:
        pass  # the client half-closed; the stream stays open for updates

    def on_reset(self) -> None:
        if self.service is not None:
            self.state.unwatch(self.service, self.responder)
