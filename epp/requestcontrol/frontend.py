"""What a protocol front end (ext_proc) needs of request control: a service that takes a request
and gives back its routed side. The director and its ``Routed`` are the in-process ones; a worker
process (``--workers``) has proxies that carry the same calls to the process holding the routing
state."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from epp.requestcontrol.pending import Pending
from epp.requestcontrol.refused import Refused
from epp.requestcontrol.routed import RequestInput, ResponseAccess
from epp.requestcontrol.usage import UsageReader


class RoutedSide(Protocol):
    """A committed pick as the front end sees it: where to send the request, and the response's
    events (headers, body chunks, the end) told back."""

    status: int  # the response's HTTP status, set by the front end
    done: bool
    wants_chunks: bool  # a chunk that is not the last matters (before the first bytes, or usage read)
    watch_response: bool  # something reads the response body (else the gateway may skip it)
    forward_body: bytes | None  # the request body to send, when epp changed it
    reader: UsageReader | None
    usage_required: bool  # every response's usage matters (metering, token limits, fairness, shadows)
    # The front end's way to end the request while it runs (in-flight eviction), set by a front end
    # that can: an ext_proc stream open through the response.
    revoke: Callable[[], None] | None
    # Flow control may revoke this request while it runs (eviction on, its priority evictable): a
    # front end that can keeps the response from the client until its first bytes, so that a
    # revocation before them is a whole 429 rather than a 200 that breaks off.
    revocable: bool

    @property
    def header_value(self) -> str: ...

    @property
    def request_headers(self) -> tuple[tuple[str, str], ...]: ...

    @property
    def removed_headers(self) -> tuple[str, ...]: ...

    def endpoint_scores(self) -> dict[str, float]: ...

    def response_headers(self, explain: bool) -> tuple[tuple[str, str], ...]: ...

    def served_by(self, endpoint: str) -> None: ...

    def response_body(self, data: bytes, eos: bool) -> bytes: ...

    def finish(self) -> None: ...

    def hand_over(self) -> None:
        """This stream is done with the pick but the request goes on: observer streams read its
        response and end it (--observed-responses). Nothing ends here."""
        ...


Ready = Callable[[RoutedSide | Refused], None]


class PickService(Protocol):
    """Takes a request: its routed side now, a ``Pending`` whose ``ready`` gets it later (flow
    control, a token fetch, another process), or raises Refused."""

    def submit(self, given: RequestInput, access: ResponseAccess = ResponseAccess.NONE,
               ready: Ready | None = None) -> RoutedSide | Pending: ...
