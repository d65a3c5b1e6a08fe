"""``session-affinity-scorer`` (the reference's type): 1.0 for the pod that served the session
before, 0 for the others.

- ``strategy: encoded_endpoint_header`` (default): stateless. The request header
  (``encodedEndpointHeaderConfig.header``, default ``x-session-token``) carries the base64 of the
  endpoint that served the session; epp writes that header on every response, so the client
  echoes it back. As the reference, the token is the endpoint's namespace/name
  (``ns/pod-rank-N``) when Kubernetes discovery names it, else its address; either form is read,
  so sessions carry over when epp replaces the reference.
- ``strategy: session_id``: the client sends an opaque id (``sessionIdConfig.sources``, header
  sources in priority order, default ``x-session-id``); epp binds it to the pod that served it
  and forgets a binding unused for ``evictionTtlSeconds`` (300; swept every
  ``evictionSweepSeconds``, 10; at most 100,000 bindings, and an id over 64 characters is kept
  as its hash). An unbound session, or one whose pod is not a candidate, scores
  0 everywhere and is bound to wherever the request goes.

``profileName`` (the profile whose pick is remembered, for P/D) is refused: epp runs one
profile. Attribute sources (values other plugins publish) are refused: no epp plugin publishes
request attributes. The Pick API has no response to write a header on: its callers use
``session_id``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Mapping, Sequence
from typing import ClassVar

from epp.datastore.endpoint import EndpointState
from epp.datastore.store import Snapshot
from epp.request import InferenceRequest
from epp.scheduling.contract import ObservesPicks, Scorer, WritesResponseHeaders
from epp.scheduling.params import Params
from epp.scheduling.types import ConfigError, CycleState, Slot

ENCODED = "encoded_endpoint_header"
SESSION_ID = "session_id"
MAX_SESSIONS = 100_000  # bindings kept at most (the oldest go first beyond it)
MAX_ID_CHARS = 64  # a longer session id is kept as its hash: clients choose ids, memory stays bounded


def encode(endpoint: str) -> str:
    return base64.b64encode(endpoint.encode()).decode()


def decode(token: str) -> str:
    if not token:
        return ""
    try:
        return base64.b64decode(token.strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return ""


class SessionAffinityScorer(Scorer, ObservesPicks, WritesResponseHeaders):
    type_name: ClassVar[str] = "session-affinity-scorer"

    def __init__(self, name: str, params: Params) -> None:
        self.name = name
        path = params.path
        self.strategy = params.text("strategy", ENCODED, choices=(ENCODED, SESSION_ID)) or ENCODED
        if params.text("profileName"):
            raise ConfigError(f"{path}.profileName", "not supported by epp (it runs one profile: the pick "
                                                     "remembered is the request's)")
        encoded = params.section("encodedEndpointHeaderConfig")
        session = params.section("sessionIdConfig")
        params.done()
        unread = session if self.strategy == ENCODED else encoded
        if unread is not None:
            wanted = SESSION_ID if self.strategy == ENCODED else ENCODED
            raise ConfigError(unread.path, f"is only read with strategy {wanted}")
        self.header = "x-session-token"
        self.sources: tuple[str, ...] = ("x-session-id",)
        self.ttl = 300.0
        self.sweep_every = 10.0
        if encoded is not None:
            self.header = (encoded.text("header", self.header) or self.header).strip().lower()
            encoded.done()
        if session is not None:
            sources = session.sections("sources")
            self.ttl = session.float("evictionTtlSeconds", 300.0, minimum=1e-3)
            self.sweep_every = session.float("evictionSweepSeconds", 10.0, minimum=1e-3)
            session.done()
            names = []
            for src in sources:
                if src.text("attribute") is not None or src.text("producer") is not None:
                    raise ConfigError(f"{src.path}.attribute", "not supported by epp (no epp plugin publishes "
                                                                "request attributes): use a header source")
                header = src.text("header")
                src.done()
                if not header or not header.strip():
                    raise ConfigError(f"{src.path}.header", "required (exactly one of header or attribute)")
                names.append(header.strip().lower())
            if names:
                self.sources = tuple(names)
        self.bindings: dict[str, tuple[str, float]] = {}  # session id -> (endpoint, last seen), oldest first
        self._swept = 0.0
        self._session: Slot[tuple[str, float]] = Slot(f"{name}/session")
        self._names: Slot[dict[str, str]] = Slot(f"{name}/names")  # the candidates' names, when discovered

    def _session_id(self, headers: Mapping[str, str]) -> str:
        for h in self.sources:
            value = (headers.get(h) or "").strip()
            if len(value) > MAX_ID_CHARS:
                return hashlib.blake2b(value.encode(), digest_size=16).hexdigest()
            if value:
                return value
        return ""

    def score(self, request: InferenceRequest, snapshot: Snapshot, candidates: list[EndpointState],
              cycle: CycleState) -> list[float]:
        headers = request.headers
        if self.strategy == ENCODED:
            want = decode(headers.get(self.header) or "")
            named = {c.address: c.name for c in candidates if c.name}
            if named:
                cycle.put(self._names, named)
                return [1.0 if want and want in (c.address, c.name) else 0.0 for c in candidates]
        else:
            now = snapshot.now
            self._sweep(now)
            sid = self._session_id(headers)
            want = ""
            if sid:
                cycle.put(self._session, (sid, now))
                bound = self.bindings.get(sid)
                if bound is not None and now - bound[1] <= self.ttl:
                    want = bound[0]
        return [1.0 if c.address == want else 0.0 for c in candidates] if want else [0.0] * len(candidates)

    def _sweep(self, now: float) -> None:
        if now - self._swept < self.sweep_every:
            return
        self._swept = now
        ttl = self.ttl
        for sid in [s for s, (_, seen) in self.bindings.items() if now - seen > ttl]:
            del self.bindings[sid]

    def on_pick(self, endpoint: str, cycle: CycleState) -> None:
        session = cycle.get(self._session)
        if session is not None:
            sid, now = session
            self.bindings.pop(sid, None)
            self.bindings[sid] = (endpoint, now)  # the newest last
            if len(self.bindings) > MAX_SESSIONS:
                del self.bindings[next(iter(self.bindings))]

    def response_headers(self, endpoint: str, cycle: CycleState) -> Sequence[tuple[str, str]]:
        if self.strategy != ENCODED:
            return ()
        named = cycle.get(self._names)
        return ((self.header, encode(named.get(endpoint) or endpoint if named else endpoint)),)
