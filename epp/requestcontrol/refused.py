"""``Refused``: the one way a request is turned away, whatever refused it and whatever the front end.

Each adapter maps it to its wire form: ext_proc an ImmediateResponse with the OpenAI-style JSON
body, the Pick API a gRPC status (``grpc_code``), the gateway an HTTP response.
"""

from __future__ import annotations

import orjson

# HTTP status -> OpenAI error type (the ``error.type`` clients switch on).
ERROR_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError", 413: "BadRequestError",
               429: "RateLimitError", 500: "InternalServerError", 503: "ServiceUnavailableError"}
# HTTP status -> gRPC status code (INVALID_ARGUMENT, UNAUTHENTICATED, NOT_FOUND, RESOURCE_EXHAUSTED,
# INTERNAL, UNAVAILABLE).
GRPC_CODES = {400: 3, 401: 16, 404: 5, 413: 8, 429: 8, 500: 13, 503: 14}


DROPPED_REASON_HEADER = "x-llm-d-request-dropped-reason"
SATURATED = "rejected-saturated"  # the reference's reason codes
NO_ENDPOINTS = "rejected-no-endpoints"
TTL_EXPIRED = "rejected-ttl-expired"
SHUTTING_DOWN = "rejected-shutting-down"
EVICTED = "evicted"


class Refused(Exception):
    """A request epp does not route: HTTP ``status``, a one-line reason, the offending field, and
    for a request dropped before dispatch the reference's reason code (``dropped``)."""

    def __init__(self, status: int, message: str, param: str | None = None, dropped: str | None = None,
                 headers: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.dropped = dropped
        self.headers = headers  # more response headers (a rate limit's Retry-After and x-ratelimit-*)

    @property
    def err_type(self) -> str:
        return ERROR_TYPES.get(self.status, "BadRequestError" if self.status < 500 else "InternalServerError")

    @property
    def grpc_code(self) -> int:
        return GRPC_CODES.get(self.status, 3 if self.status < 500 else 13)

    def body(self) -> bytes:
        """The OpenAI-style JSON error body."""
        return orjson.dumps({"error": {"message": self.message, "type": self.err_type, "param": self.param,
                                       "code": self.status}})


class LocalAnswer(Refused):
    """A request the gateway answers itself (``GET /v1/models``): not routed, not an error.
    Front ends send it as they send a refusal, with ``payload`` as the body."""

    def __init__(self, status: int, payload: bytes) -> None:
        super().__init__(status, "answered by the gateway")
        self.payload = payload

    def body(self) -> bytes:
        return self.payload
