"""Observed responses (--observed-responses): the response read off the data path.

In gateway mode with FULL_DUPLEX_STREAMED response bodies every chunk of every stream waits for
epp's answer before it goes on to the client, and costs Envoy and epp a message each way. With
``envoy/epp-observed.yaml`` the gateway runs three ext_proc filters on epp's cluster instead:

- the pick filter: request headers and body (the pick, as before) and the response headers
  (epp's response headers, the status); no response body;
- the ``first`` observer (Envoy's ``observability_mode``: Envoy sends and waits for nothing): the
  request headers (with the pick's token) and the response body as it passes. epp takes its
  first bytes (the prefill is done), then ends the stream, so Envoy sends no more of it, unless
  the response's usage must be read (metering, token limits, fairness, shadow configs) or the
  stream is one of the sampled ones (``usage_sample``, for the latency model's TPOT and the
  caches' hit feedback): those it reads to the end;
- the ``end`` observer: the request headers only, and ``deferred_close_timeout: 0s``, so Envoy
  ends its stream when the request ends: that ends the request's in-flight count.

Each observer filter names its role in the gRPC metadata ``ROLE_HEADER``; one without it reads
every chunk and ends the request at the response's end (``all``). The pick's answer carries a
token in ``PICK_TOKEN_HEADER``; the observers' request headers bring it back. ``ObservedPicks``
holds the picks until their observers claim them: a pick whose end no observer claims within
``attach_timeout`` (a gateway without the observer filters) is finished then, logged once and
counted, so nothing stays in flight. Whether a ``first`` observer reads on past the first bytes
is decided when the pick is registered and travels in its token. epp cannot change an observed
response, so it asks a stream for no usage it would have to cut out: a stream reports usage only
when its client asks. With --workers the registry lives in the serving process and a worker's
observer streams claim through its link (``epp.server.workerlink``): a pick and its observers may
reach different workers.
"""

from __future__ import annotations

import itertools
import logging
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import NamedTuple, Protocol

from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from prometheus_client import CollectorRegistry, Counter

from epp.requestcontrol.frontend import RoutedSide

PICK_TOKEN_HEADER = "x-epp-observed-pick"
ROLE_HEADER = "x-epp-observer"  # the gRPC metadata an observer filter sets: first | end
ALL, FIRST, END = "all", "first", "end"
ROLES = (ALL, FIRST, END)
ATTACH_TIMEOUT_S = 5.0  # the observers' request headers follow the pick by milliseconds
END_GRACE_S = 1.0  # an end observer waits this long for the first observer that reads to the end
# The share of streams read to their end for their usage. 0.1 until 2026-12-07: those streams were
# ~half of the ext_proc messages per request; at 0.02 the routing bench's Envoy + epp spent 10-27%
# less per request with the latency model's error unchanged (10.2 vs 10.5%, 10.9 vs 10.9%).
USAGE_SAMPLE = 0.02
READ_ON, FIRST_ONLY = "r", "f"  # a token's last character: its first observer reads to the end, or not

log = logging.getLogger("epp.observed")


class Claim(NamedTuple):
    """What an observer stream's token gives it: the pick, and whether a ``first`` observer reads
    its response to the end (its usage is needed, or it is in the sample)."""

    pick: RoutedSide
    read_to_end: bool


class ObserverRegistry(Protocol):
    """Where a pick stream hands its pick over and observer streams claim it (in process:
    ``ObservedPicks``; in a worker: its link to the serving process's)."""

    def register(self, pick: RoutedSide) -> str:
        """The token the pick's answer carries to its observers."""
        ...

    def claim(self, token: str, role: str) -> Claim | None:
        """The pick of ``token`` for an observer stream of ``role`` (None: unknown, or no longer
        waiting for that role)."""
        ...

    def end(self, pick: RoutedSide, read_to_end: bool) -> None:
        """An ``end`` observer's stream closed: the request is over. When a ``first`` observer reads
        the pick's response to the end, its last chunk (the usage) may still be on its way on
        another connection: it ends the pick, or this does after ``END_GRACE_S``."""
        ...


def reads_to_end(token: str) -> bool:
    return token.endswith(READ_ON)


class ObservedPicks:
    """Picks waiting for their observer streams, by token (one per server, shared by its streams)."""

    def __init__(self, registry: CollectorRegistry | None = None, attach_timeout: float = ATTACH_TIMEOUT_S,
                 usage_sample: float = USAGE_SAMPLE, clock: Callable[[], float] = time.monotonic) -> None:
        self.attach_timeout = attach_timeout
        self.clock = clock
        self.every = max(1, round(1.0 / usage_sample)) if usage_sample > 0 else 0  # read 1 in N to the end
        self._streams = 0
        self._prefix = secrets.token_hex(4)  # (a token per pick from a counter: no random draw each)
        self._serial = itertools.count(1)
        # token -> (deadline, pick, the roles still to claim it), in deadline order
        self._waiting: OrderedDict[str, tuple[float, RoutedSide, set[str]]] = OrderedDict()
        self._ending: deque[tuple[float, RoutedSide]] = deque()  # ended, waiting for their reader's last chunk
        self.counter = Counter("epp_observed_picks_total", "Picks whose response observer streams read "
                               "(--observed-responses): attached, or unclaimed (finished without their response's "
                               "end after the attach timeout).", ["outcome"], registry=registry)
        self._attached, self._unclaimed = self.counter.labels("attached"), self.counter.labels("unclaimed")
        self.warned = False

    def register(self, pick: RoutedSide) -> str:
        """A new token for ``pick``, which now waits for its observers. (Unique is enough: the
        pick filter sets the header, so a client cannot bring its own.)"""
        self.sweep()
        token = f"{self._prefix}{next(self._serial):x}{READ_ON if self._read_to_end(pick) else FIRST_ONLY}"
        self._waiting[token] = (self.clock() + self.attach_timeout, pick, {FIRST, END})
        return token

    def claim(self, token: str, role: str) -> Claim | None:
        entry = self._waiting.get(token)
        if entry is None or (role != ALL and role not in entry[2]):
            self.sweep()
            return None
        _deadline, pick, roles = entry
        if len(roles) == 2:  # the pick's first observer
            self._attached.inc()
        if role == ALL:
            roles.clear()
        else:
            roles.discard(role)
        if not roles:
            del self._waiting[token]
        self.sweep()
        return Claim(pick, reads_to_end(token))

    def end(self, pick: RoutedSide, read_to_end: bool) -> None:
        if read_to_end and not pick.done:
            self._ending.append((self.clock() + END_GRACE_S, pick))
        else:
            pick.finish()

    def _read_to_end(self, pick: RoutedSide) -> bool:
        """Whether the pick's ``first`` observer reads past the first bytes: when its usage is
        needed, and for one stream in ``every`` (the sample that teaches what usage tells)."""
        if pick.usage_required:
            return True
        if not self.every or pick.reader is None:
            return False
        self._streams += 1
        return self._streams % self.every == 0

    def sweep(self) -> None:
        """Finish the picks whose end no observer claimed in time (they are registered in deadline
        order), and the ended ones whose reader did not bring their last chunk within the grace."""
        now = self.clock()
        ending = self._ending
        while ending and ending[0][0] <= now:
            pick = ending.popleft()[1]
            if not pick.done:
                pick.finish()
        waiting = self._waiting
        while waiting:
            token, (deadline, pick, roles) = next(iter(waiting.items()))
            if deadline > now:
                return
            del waiting[token]
            if END not in roles:  # (its end observer finishes it)
                if FIRST in roles and not pick.done:
                    # A first observer in a worker claims at the first bytes: a slow prefill's come
                    # later than the timeout. Kept while the pick is in flight (in deadline order).
                    waiting[token] = (now + self.attach_timeout, pick, roles)
                continue
            self._unclaimed.inc()
            if not self.warned:
                self.warned = True
                log.warning("no observer stream claimed the end of a pick within %gs: with "
                            "--observed-responses the gateway needs the observer ext_proc filters "
                            "(envoy/epp-observed.yaml); epp finishes such picks without their response",
                            self.attach_timeout)
            pick.finish()

    def __len__(self) -> int:
        return len(self._waiting)


class ObserverStream:
    """One observer ext_proc stream (Envoy's observability_mode), sans I/O: the response of the pick
    whose token its request headers carry, read as its ``role`` says. Envoy waits for no answer,
    so ``on_message`` returns none; ``ended`` says epp may end the stream (what it reads is read)."""

    __slots__ = ("_claimed", "_observed", "_read_on", "_reading", "emit", "ended", "pick", "role")

    def __init__(self, observed: ObserverRegistry, role: str = ALL) -> None:
        self._observed = observed
        self.role = role
        self.pick: RoutedSide | None = None
        self._claimed = False
        self._read_on = False  # a ``first`` observer reads past the first bytes (the pick's token says)
        self._reading = False  # past the first bytes
        self.ended = False
        self.emit: Callable[[list[bytes]], None] | None = None  # (the adapter's; nothing is sent later)

    holding = False  # nothing is ever held: the adapter may end the stream when the gateway does

    def on_message(self, msg: pb.ProcessingRequest) -> list[bytes]:
        kind = msg.WhichOneof("request")
        if kind == "request_headers":
            if not self._claimed:
                self._claimed = True
                token = next((h.raw_value.decode() or h.value for h in msg.request_headers.headers.headers
                              if h.key == PICK_TOKEN_HEADER), "")
                claim = self._observed.claim(token, self.role) if token else None
                if claim is not None:
                    self.pick, self._read_on = claim
            return []
        pick = self.pick
        if pick is None or self.role == END:
            return []
        if kind == "response_body":
            body = msg.response_body
            if body.end_of_stream:
                self.ended = True
                if not pick.done:
                    pick.response_body(body.body, True)
            elif not pick.done and (pick.wants_chunks or not self._reading):
                pick.response_body(body.body, False)
                if not self._reading and body.body:  # the first bytes: read on, or end the stream here
                    self._reading = self.role == ALL or self._read_on
                    self.ended = not self._reading
        elif kind == "response_headers":
            if msg.response_headers.end_of_stream:
                self.ended = True
                pick.finish()
        elif kind == "response_trailers":
            self.ended = True
            pick.finish()
        return []

    def close(self) -> None:
        """The stream ended: the end of the request for an ``end`` observer, and for one that was
        reading; a ``first`` observer that stopped at the first bytes leaves it to the end observer."""
        if self.pick is None:
            return
        if self.role == FIRST and not self._reading:
            self.pick.hand_over()
        elif self.role == END:
            self._observed.end(self.pick, self._read_on)
        else:
            self.pick.finish()
