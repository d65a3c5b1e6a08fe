"""A routed request's side after the pick: what a front end has of a request (``RequestInput``),
what it lets epp do with the response body (``ResponseAccess``), and ``Routed``, the committed
decision taking the response (first bytes, body and usage, the end, exactly once).

``Routed`` reports back through a ``Ledger`` (the director: in-flight counts, metrics, limits,
metering): this module imports nothing of the director, so the waiting room and the pending
requests that hand out ``Routed`` do not either.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any, Protocol

from epp.flowcontrol.contract import ObservesFlows
from epp.observability.metrics import PickerMetrics, RequestLabels, ResponseFacts
from epp.request import InferenceRequest
from epp.requestcontrol.apikeys import API_KEY, ApiKey
from epp.requestcontrol.ejections import Ejections
from epp.requestcontrol.metering import Metering, UsageRecord
from epp.requestcontrol.ratelimits import RateLimits, Slot
from epp.requestcontrol.recorder import Outcome, Recorder
from epp.requestcontrol.shadow import ShadowEvaluation, ShadowPick
from epp.requestcontrol.usage import UsageReader
from epp.scheduling.framework import Scheduler
from epp.scheduling.types import Completion, Decision, Usage

SLOT = "concurrency-slot"  # the API key's concurrency slot (InferenceRequest.prepared)
KEY_HEADERS = ("authorization", "x-api-key")


class Ledger(Protocol):
    """What a routed request reports to and reads from (the director)."""

    metrics: PickerMetrics
    rate_limits: RateLimits
    strip_keys: bool
    upstream_auth: tuple[tuple[str, str], ...]
    ejections: Ejections | None
    metering: Metering | None
    recorder: Recorder | None

    def move(self, old: str, new: str) -> bool: ...

    def prefilled(self, endpoint: str, tokens: int, routed: Routed) -> None: ...

    def prefill_stage_done(self, endpoint: str, tokens: int) -> None: ...

    def finished(self, endpoint: str, labels: RequestLabels, started: float, routed: Routed) -> None: ...


class ResponseAccess(Enum):
    """What the front end lets the director do with the response body."""

    NONE = "none"  # it never sees the body
    READ = "read"  # it sees the body (usage can be read) but cannot change the request body
    INJECT = "inject"  # it sees the body and forwards the request body epp returns (usage can be asked for)


@dataclass(slots=True)
class RequestInput:
    """One request as a front end has it. ``body`` None: the body goes by unseen (or there is
    none); the Pick API may give ``model`` with ``prompt`` or ``messages`` instead of a body."""

    headers: Mapping[str, str]
    path: str
    body: bytes | None = None
    model: str = ""
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    subset: tuple[str, ...] | None = None  # the gateway's subset hint: pick only from these (by host)


class Routed:
    """A committed decision and its response side; ``finish`` ends it exactly once."""

    __slots__ = ("_director", "_first_at", "_itl", "_labels", "_last_chunk_at", "_processing", "_response_bytes",
                 "_started", "decision", "done", "endpoint", "flow", "forward_body", "prefill_tokens", "prefilled",
                 "queued", "reader", "request", "revocable", "revoke", "scheduler", "served", "shadows", "status",
                 "streamed", "tokens", "usage_required", "wants_chunks", "watch_response")

    def __init__(self, director: Ledger, scheduler: Scheduler, request: InferenceRequest, decision: Decision,
                 labels: RequestLabels, started: float) -> None:
        self._director = director
        self.scheduler = scheduler  # the one that decided (a config reload may have replaced it since)
        self.request = request
        self.decision = decision
        self._labels = labels  # as the metrics show them (bounded)
        self._started = started
        self.forward_body: bytes | None = None  # the request body to send, when epp changed it
        self.reader: UsageReader | None = None  # reads (and maybe strips) usage from the response body
        self.usage_required = False  # the usage of this very response matters, not only a sample's
        self.endpoint = decision.primary  # where the in-flight count is kept (the served one, once known)
        self.done = False
        self.prefilled = False
        self.streamed = False  # the response body came in pieces, the first before the end
        self.tokens = 0  # prompt tokens counted in flight on the endpoint until the prefill is done
        self.prefill_tokens = 0  # P/D: those counted on the prefill pod instead
        self.queued = 0.0  # seconds flow control held the request
        self.flow: tuple[str, ObservesFlows] | None = None  # a fairness policy that hears how it ended
        self.served: str | None = None  # the endpoint the gateway says served it (after its retries)
        # Set by a front end that can end this request while it runs (an ext_proc stream open
        # through the response): in-flight eviction calls it; it answers 429 and ends the stream.
        self.revoke: Callable[[], None] | None = None
        self.revocable = False  # flow control tracks it as an eviction victim
        self.status = 0  # the response's HTTP status (0: none came)
        self.shadows: list[ShadowPick] = []  # the shadow configs' decisions for this request (sampled)
        # Whether a response chunk that is not the last one matters (before the first bytes, or
        # while usage is read): a front end may skip ``response_body`` for the others.
        self.wants_chunks = True
        # Whether anything in epp reads the response body (its first bytes, usage, the series):
        # when not, a front end may ask the gateway not to send it (the end still finishes it).
        self.watch_response = True
        # The response series (sizes, TTFT, inter-chunk latency, epp's time on the response).
        self._first_at: float | None = None
        self._last_chunk_at = 0.0
        self._response_bytes: int | None = None
        self._processing = 0.0
        self._itl: Any = None

    @property
    def header_value(self) -> str:
        """The destination the gateway is given: the chosen endpoints, as the profile handler
        shapes them (a data-parallel pod's primary port), primary first."""
        return ",".join(self.decision.targets)

    @property
    def request_headers(self) -> tuple[tuple[str, str], ...]:
        """Headers to set on the request to the server (a data-parallel rank; the servers' own key)."""
        upstream = self._director.upstream_auth
        return self.decision.request_headers + upstream if upstream else self.decision.request_headers

    @property
    def removed_headers(self) -> tuple[str, ...]:
        """Headers the server must not see: the client's API key, once the gateway checked it
        (``authorization`` is overwritten instead when the servers have their own key)."""
        d = self._director
        if not d.strip_keys or API_KEY not in self.request.prepared:
            return ()
        return KEY_HEADERS[1:] if d.upstream_auth else KEY_HEADERS

    def endpoint_scores(self) -> dict[str, float]:
        """Each picked endpoint's weighted total (primary and fallbacks)."""
        d = self.decision
        index = {c.address: i for i, c in enumerate(d.candidates)}
        return {a: d.totals[index[a]] for a in d.endpoints}

    def served_by(self, endpoint: str) -> None:
        """The gateway says ``endpoint`` served the request (a fallback, after a retry): its
        in-flight count moves there."""
        d = self.decision
        if d.destinations and endpoint in d.destinations:  # the gateway names the shaped address
            endpoint = d.endpoints[d.destinations.index(endpoint)]
        self.served = endpoint
        if endpoint and endpoint != self.endpoint and not self.done and self._director.move(self.endpoint, endpoint):
            self.endpoint = endpoint

    def explain(self) -> tuple[tuple[str, str], ...]:
        """Response headers naming the pick, why, and how long flow control held the request
        (opt-in: --decision-headers=true)."""
        return (("x-epp-endpoint", self.header_value), ("x-epp-reason", self.decision.reason()),
                ("x-epp-queue-ms", f"{self.queued * 1000:.1f}"))

    def response_headers(self, explain: bool) -> tuple[tuple[str, str], ...]:
        """The headers epp sets on the response: the plugins' (a session token), the API key's
        rate limits and, with ``explain``, the decision headers."""
        return self.response_headers_for(self.endpoint, explain)

    def response_headers_for(self, endpoint: str, explain: bool) -> tuple[tuple[str, str], ...]:
        """``response_headers`` as they would be if ``endpoint`` served the request."""
        own = tuple(self.scheduler.response_headers(self.decision, endpoint))
        key = self.request.prepared.get(API_KEY)
        if isinstance(key, ApiKey) and (key.rpm is not None or key.tpm is not None):
            own += self._director.rate_limits.headers(key)  # (concurrency is not a rate: no headers)
        return own + self.explain() if explain else own

    def first_bytes(self) -> None:
        """The response's first body bytes arrived: the pod has finished this prompt's prefill."""
        if not self.prefilled:
            self.prefilled = True
            self._first_at = time.perf_counter()
            self.wants_chunks = self.reader is not None
            self.scheduler.prefill_done(self.decision)
            for p in self.shadows:
                p.candidate.scheduler.prefill_done(p.decision)
            self._director.prefilled(self.decision.primary, self.tokens, self)
            prefill = self.decision.prefill
            if prefill is not None:  # P/D: the prefill pod is done with this request
                self._director.prefill_stage_done(prefill.primary, self.prefill_tokens)

    def response_started(self) -> None:
        """A front end reports the response's first bytes ahead of its end (the Pick API)."""
        if not self.prefilled:
            self.first_bytes()
            self.streamed = True

    def response_body(self, data: bytes, eos: bool) -> bytes:
        """One chunk of the response body; returns the bytes to forward (usage epp asked for is
        cut out). The last chunk (``eos``) reports the usage and finishes the request."""
        t0 = time.perf_counter()
        self._response_bytes = (self._response_bytes or 0) + len(data)
        if data:
            if not self.prefilled:
                self.first_bytes()
                self.streamed = not eos
            elif self.streamed and self._last_chunk_at and self.streaming():
                if self._itl is None:
                    self._itl = self._director.metrics.child(self._director.metrics.llmd_itl, *self._labels)
                self._itl.observe(t0 - self._last_chunk_at)
            self._last_chunk_at = t0
        reader = self.reader
        if reader is not None:
            data = reader.feed(data, eos)
            if eos and reader.cached_tokens is not None:
                self.usage(reader.cached_tokens)
        self._processing += time.perf_counter() - t0
        if eos:
            self.finish()
        return data

    def ended_elsewhere(self, usage: Usage | None, streamed: bool, response_bytes: int | None,
                        gaps: list[float], processing: float) -> None:
        """The response ended in a worker process, which read it: what ``response_body`` would have
        learnt (its usage, whether it streamed, its size, the gaps between its chunks), then the end."""
        if self.done:
            return
        self.streamed = self.streamed or streamed
        self._response_bytes = response_bytes
        self._processing += processing
        if gaps and self.streaming():
            itl = self._director.metrics.child(self._director.metrics.llmd_itl, *self._labels)
            for gap in gaps:
                itl.observe(gap)
        if usage is not None:
            reader = UsageReader(strip=False)
            reader.prompt_tokens, reader.cached_tokens, reader.completion_tokens = (
                usage.prompt_tokens, usage.cached_tokens, usage.completion_tokens)
            self.reader = reader
            if usage.cached_tokens is not None:
                self.usage(usage.cached_tokens)
        self.finish()

    def usage(self, cached_tokens: int) -> None:
        """The response reported how many prompt tokens the pod served from its cache."""
        self.scheduler.usage(self.decision, cached_tokens)
        for p in self.shadows:
            p.candidate.scheduler.usage(p.decision, cached_tokens)

    def hand_over(self) -> None:
        """(In process, the observer streams hold this same pick: nothing to pass on.)"""

    def finish(self) -> None:
        if not self.done:
            self.done = True
            self.revoke = None  # (the front end's: no cycle left for the collector)
            self.first_bytes()
            reader = self.reader
            usage = None if reader is None or not reader.completion_tokens else Usage(
                reader.prompt_tokens, reader.cached_tokens, reader.completion_tokens)
            completion = Completion(usage, self.streamed, self.status in (0, 200))
            self.scheduler.completed(self.decision, completion)
            if self.shadows:
                for p in self.shadows:
                    p.candidate.scheduler.completed(p.decision, completion)
                if reader is not None and reader.cached_tokens is not None and reader.prompt_tokens:
                    ShadowEvaluation.reported(self.shadows, reader.prompt_tokens, reader.cached_tokens)
            self._director.finished(self.endpoint, self._labels, self._started, self)
            slot = self.request.prepared.get(SLOT)
            if isinstance(slot, Slot):
                slot.release()
            ejections = self._director.ejections
            if ejections is not None and self.served is not None:
                tried = self.decision.endpoints
                upto = tried.index(self.served) + 1 if self.served in tried else len(tried)
                ejections.outcome(tried[:upto], self.served, self.status)
            self._report(reader)
            if self.flow is not None:
                flow_id, policy = self.flow
                policy.on_completed(flow_id, reader.prompt_tokens if reader else 0,
                                    reader.completion_tokens if reader else 0)


    def streaming(self) -> bool:
        """The client asked for a stream (else: the response came in more than one chunk)."""
        body = self.request.body
        return body.get("stream") is True if body is not None else self.streamed

    def _report(self, reader: UsageReader | None) -> None:
        """The response series, at the end."""
        now = time.perf_counter()
        arrived = self.request.arrived or self._started
        first = self._first_at
        facts = ResponseFacts(now - arrived, self.streaming(), self.request.body_bytes, self._response_bytes,
                              (first - arrived) if first is not None else None,
                              processing=self._processing if self._response_bytes is not None else None)
        if reader is not None:
            facts.prompt_tokens = reader.prompt_tokens or 0
            facts.completion_tokens = reader.completion_tokens or 0
            facts.cached_tokens = reader.cached_tokens
        self._director.metrics.response_observed(self._labels, facts)
        if reader is not None:
            self._director.metrics.activity.served(self.endpoint, facts.prompt_tokens, facts.cached_tokens)
        key = self.request.prepared.get(API_KEY)
        if isinstance(key, ApiKey) and key.tpm is not None:
            self._director.rate_limits.charge(key, facts.prompt_tokens + facts.completion_tokens)
        recorder = self._director.recorder
        if recorder is not None and recorder.active:
            recorder.finished(self.request, Outcome(self.status, self.served or self.endpoint, facts.prompt_tokens,
                                                    facts.completion_tokens, facts.cached_tokens, facts.ttft,
                                                    facts.e2e, self.streaming()))
        metering = self._director.metering
        if metering is not None:
            metering.record(UsageRecord(
                self.request.request_id, self.request.tenant, key.key_id if isinstance(key, ApiKey) else "",
                self._labels.model, self.served or self.endpoint, self.status, facts.prompt_tokens,
                facts.completion_tokens, facts.cached_tokens or 0, facts.ttft, facts.e2e, self.streaming()))
