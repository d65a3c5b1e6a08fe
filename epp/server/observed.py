"""Observed responses (--observed-responses): the response read off the data path.

In gateway mode with FULL_DUPLEX_STREAMED response bodies every chunk of every stream waits for
epp's answer before it goes on to the client. With ``envoy/epp-observed.yaml`` the gateway runs
two ext_proc filters on epp's cluster instead:

- the pick filter: request headers and body (the pick, as before) and the response headers
  (epp's response headers, the status); no response body;
- an observer filter in Envoy's ``observability_mode``: Envoy sends it the request headers (with
  the pick filter's mutations) and every response body chunk as they pass, and waits for nothing.

The pick's answer carries a token in ``PICK_TOKEN_HEADER``; the observer stream's request headers
bring it back, and the observer stream then feeds that pick's response events (first bytes,
usage, the end). ``ObservedPicks`` holds the picks between the two: a pick no observer claims
within ``attach_timeout`` (a gateway without the observer filter) is finished then, logged once
and counted, so nothing stays in flight. Consequences: epp cannot cut the usage it asks for out
of a stream, so it asks for none (a stream teaches the latency model only when its client asks
for usage); and both streams must reach the same process (--workers 0).
"""

from __future__ import annotations

import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter

from epp.requestcontrol.frontend import RoutedSide

PICK_TOKEN_HEADER = "x-epp-observed-pick"
ATTACH_TIMEOUT_S = 5.0  # the observer's request headers follow the pick by milliseconds

log = logging.getLogger("epp.observed")


class ObservedPicks:
    """Picks waiting for their observer stream, by token (one per server, shared by its streams)."""

    def __init__(self, registry: CollectorRegistry | None = None, attach_timeout: float = ATTACH_TIMEOUT_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.attach_timeout = attach_timeout
        self.clock = clock
        self._waiting: OrderedDict[str, tuple[float, RoutedSide]] = OrderedDict()
        self.counter = Counter("epp_observed_picks_total", "Picks whose response an observer stream read "
                               "(--observed-responses): attached, or unclaimed (finished without their response "
                               "after the attach timeout).", ["outcome"], registry=registry)
        self._attached, self._unclaimed = self.counter.labels("attached"), self.counter.labels("unclaimed")
        self.warned = False

    def register(self, pick: RoutedSide) -> str:
        """A new token for ``pick``, which now waits for its observer."""
        self.sweep()
        token = secrets.token_hex(8)
        self._waiting[token] = (self.clock() + self.attach_timeout, pick)
        return token

    def claim(self, token: str) -> RoutedSide | None:
        """The pick of ``token`` for its observer stream (None: unknown, or already finished)."""
        entry = self._waiting.pop(token, None)
        self.sweep()
        if entry is None:
            return None
        self._attached.inc()
        return entry[1]

    def sweep(self) -> None:
        """Finish the picks no observer claimed in time (they are registered in deadline order)."""
        now = self.clock()
        waiting = self._waiting
        while waiting:
            token, (deadline, pick) = next(iter(waiting.items()))
            if deadline > now:
                return
            del waiting[token]
            self._unclaimed.inc()
            if not self.warned:
                self.warned = True
                log.warning("no observer stream claimed a pick within %.0fs: with --observed-responses the "
                            "gateway needs the observer ext_proc filter (envoy/epp-observed.yaml); epp finishes "
                            "such picks without their response", self.attach_timeout)
            pick.finish()

    def __len__(self) -> int:
        return len(self._waiting)
