"""The director: one request's life, for every front end (ext_proc, the Pick API).

``submit`` takes what the front end has (headers, path, the body or the Pick API's fields) and
runs: parse -> policies (objective priority, model rewrite) -> token ids (the token producer,
which may have to fetch them first) -> admission -> schedule -> commit, where with flow control
on admission is the waiting room (epp.requestcontrol.waiting), which may hold the request and
schedule it later. It returns a ``Routed`` (or a ``Pending`` whose ``ready`` gets one later) or
raises ``Refused`` (counted and logged here, mapped to the wire by the adapter).
``Routed`` then takes the response side, whatever carries it: first bytes (prefill done), the
body (usage read, and stripped when epp asked for it), usage reported directly, and the end,
which releases the in-flight count exactly once.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from enum import Enum
from typing import Any

from epp.datastore.store import Datastore, Snapshot
from epp.flowcontrol.config import DEFAULT_DETECTOR
from epp.flowcontrol.contract import ObservesFlows
from epp.flowcontrol.controller import FlowSettings
from epp.flowcontrol.detectors import UtilizationDetector
from epp.observability.flowmetrics import FlowMetrics
from epp.observability.metrics import PickerMetrics, RequestLabels, ResponseFacts
from epp.observability.tracing import Tracing
from epp.request import InferenceRequest
from epp.requestcontrol.admission import Admission, Admitter, SheddableAdmission
from epp.requestcontrol.apikeys import API_KEY, ApiKey, KeyTable
from epp.requestcontrol.ejections import Ejections
from epp.requestcontrol.headers import FAIRNESS_ID, MODEL_REWRITE, OBJECTIVE, header
from epp.requestcontrol.metering import Metering, UsageRecord
from epp.requestcontrol.models import models_answer
from epp.requestcontrol.parsers import default_parsers, headers_only
from epp.requestcontrol.parsing import from_fields, mutated_body, route_path
from epp.requestcontrol.pending import Pending, Preparing
from epp.requestcontrol.policies import RequestPolicies
from epp.requestcontrol.ratelimits import RateLimits, Slot
from epp.requestcontrol.refused import NO_ENDPOINTS, SATURATED, Refused
from epp.requestcontrol.shadow import ShadowEvaluation, ShadowPick
from epp.requestcontrol.tokens import Tokenizes
from epp.requestcontrol.usage import UsageReader, wants_injection
from epp.requestcontrol.waiting import Waiting, WaitingRoom
from epp.scheduling.contract import PreparesRequests
from epp.scheduling.framework import Scheduler
from epp.scheduling.params import Params
from epp.scheduling.types import MATCHED_TOKENS, Completion, Decision, SchedulingError, Usage, prompt_tokens

log = logging.getLogger("epp.director")
SLOT = "concurrency-slot"  # the API key's concurrency slot (InferenceRequest.prepared)
KEY_HEADERS = ("authorization", "x-api-key")


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
                 "queued", "reader", "request", "scheduler", "served", "shadows", "status", "streamed", "tokens",
                 "wants_chunks")

    def __init__(self, director: Director, scheduler: Scheduler, request: InferenceRequest, decision: Decision,
                 labels: RequestLabels, started: float) -> None:
        self._director = director
        self.scheduler = scheduler  # the one that decided (a config reload may have replaced it since)
        self.request = request
        self.decision = decision
        self._labels = labels  # as the metrics show them (bounded)
        self._started = started
        self.forward_body: bytes | None = None  # the request body to send, when epp changed it
        self.reader: UsageReader | None = None  # reads (and maybe strips) usage from the response body
        self.endpoint = decision.primary  # where the in-flight count is kept (the served one, once known)
        self.done = False
        self.prefilled = False
        self.streamed = False  # the response body came in pieces, the first before the end
        self.tokens = 0  # prompt tokens counted in flight on the endpoint until the prefill is done
        self.prefill_tokens = 0  # P/D: those counted on the prefill pod instead
        self.queued = 0.0  # seconds flow control held the request
        self.flow: tuple[str, ObservesFlows] | None = None  # a fairness policy that hears how it ended
        self.served: str | None = None  # the endpoint the gateway says served it (after its retries)
        self.status = 0  # the response's HTTP status (0: none came)
        self.shadows: list[ShadowPick] = []  # the shadow configs' decisions for this request (sampled)
        # Whether a response chunk that is not the last one matters (before the first bytes, or
        # while usage is read): a front end may skip ``response_body`` for the others.
        self.wants_chunks = True
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
        own = tuple(self.scheduler.response_headers(self.decision, self.endpoint))
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
            self._director.prefilled(self.decision.primary, self.tokens)
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
            elif self.streamed and self._last_chunk_at and self._streaming():
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

    def usage(self, cached_tokens: int) -> None:
        """The response reported how many prompt tokens the pod served from its cache."""
        self.scheduler.usage(self.decision, cached_tokens)
        for p in self.shadows:
            p.candidate.scheduler.usage(p.decision, cached_tokens)

    def finish(self) -> None:
        if not self.done:
            self.done = True
            self.first_bytes()
            reader = self.reader
            usage = None if reader is None or not reader.completion_tokens else Usage(
                reader.prompt_tokens, reader.cached_tokens, reader.completion_tokens)
            completion = Completion(usage, self.streamed)
            self.scheduler.completed(self.decision, completion)
            if self.shadows:
                for p in self.shadows:
                    p.candidate.scheduler.completed(p.decision, completion)
                if reader is not None and reader.cached_tokens is not None and reader.prompt_tokens:
                    ShadowEvaluation.reported(self.shadows, reader.prompt_tokens, reader.cached_tokens)
            self._director.finished(self.endpoint, self._labels, self._started)
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


    def _streaming(self) -> bool:
        body = self.request.body
        return body.get("stream") is True if body is not None else self.streamed

    def _report(self, reader: UsageReader | None) -> None:
        """The response series, at the end."""
        now = time.perf_counter()
        arrived = self.request.arrived or self._started
        first = self._first_at
        facts = ResponseFacts(now - arrived, self._streaming(), self.request.body_bytes, self._response_bytes,
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
        metering = self._director.metering
        if metering is not None:
            metering.record(UsageRecord(
                self.request.request_id, self.request.tenant, key.key_id if isinstance(key, ApiKey) else "",
                self._labels.model, self.served or self.endpoint, self.status, facts.prompt_tokens,
                facts.completion_tokens, facts.cached_tokens or 0, facts.ttft, facts.e2e, self._streaming()))


class Director:
    """Holds what a reload swaps (the scheduler, the policies, admission) and routes requests."""

    def __init__(self, store: Datastore, scheduler: Scheduler, metrics: PickerMetrics,
                 policies: RequestPolicies | None = None, admission: Admission | None = None,
                 rng: random.Random | None = None, subset_filter: bool = True, tracing: Tracing | None = None
                 ) -> None:
        self.store = store
        self.tracing = tracing  # --tracing: one span per request
        self.subset_filter = subset_filter  # off: --disable-endpoint-subset-filter
        self.scheduler = scheduler
        self.metrics = metrics
        self.admission: Admission = admission or SheddableAdmission(UtilizationDetector(
            DEFAULT_DETECTOR, Params({}, DEFAULT_DETECTOR)))
        self.rng = rng or random.Random()
        self.policies = policies or RequestPolicies()
        self.waiting: WaitingRoom | None = None  # flow control, when on
        self.admitters: tuple[Admitter, ...] = ()  # admitter plugins: after admission, before scheduling
        self.tokens: Tokenizes | None = None  # the token producer: the prompt's ids, before admission
        self.preparers: tuple[PreparesRequests, ...] = ()  # then these (the burst window), in order
        self.parsers = default_parsers()  # requestHandler.parsers: which parser reads a body
        self.keys: KeyTable | None = None  # --api-keys-file: who may send requests (None: anyone)
        self.rate_limits = RateLimits(time.monotonic)  # the keys' requests and tokens per minute
        self.strip_keys = False  # remove the client's key headers before the request goes to a server
        self.upstream_auth: tuple[tuple[str, str], ...] = ()  # the servers' own key, set on every request
        self.ejections: Ejections | None = None  # the gateway's retries: endpoints out for a while
        self.metering: Metering | None = None  # usage counters and lines, per tenant, key, model and pod
        self.models: Callable[[], list[dict[str, Any]]] | None = None  # GET /v1/models, answered here
        self.shadow: ShadowEvaluation | None = None  # candidate configs scheduling sampled requests too

    @property
    def policies(self) -> RequestPolicies:
        return self._policies

    @policies.setter
    def policies(self, policies: RequestPolicies) -> None:
        self._policies = policies
        self.metrics.models.set_configured(policies.model_names())

    # -- flow control ------------------------------------------------------------------------------
    @property
    def flow_control(self) -> bool:
        return self.waiting is not None

    def set_flow_control(self, settings: FlowSettings | None, metrics: FlowMetrics | None = None) -> None:
        """Turn flow control on (or reconfigure it) with ``settings``, or off with None; turned
        off, whatever waits is dispatched at once."""
        room = self.waiting
        if settings is None:
            self.waiting = None
            if room is not None:
                room.release_all()
        elif room is None:
            self.waiting = WaitingRoom(settings, self.store, self._deliver, self._held_refused, metrics,
                                       self._prefill_estimate)
        else:
            room.reconfigure(settings)

    # -- the request path -------------------------------------------------------------------------
    def submit(self, given: RequestInput, access: ResponseAccess = ResponseAccess.NONE,
               ready: Callable[[Routed | Refused], None] | None = None) -> Routed | Pending:
        """Parse, apply policies, admit and schedule now; or hold the request (a ``Pending`` whose
        ``ready`` gets the outcome later: flow control holds it, or its token ids are being
        fetched). Raises Refused."""
        tracing = self.tracing
        if tracing is None:
            return self._submit(given, access, ready)
        span = tracing.start(given.headers)
        try:
            out = self._submit(given, access, ready)
        except Refused as e:
            tracing.failed(span, e.message)
            raise
        else:
            span.set_attributes({"target_model": out.request.target_model or out.request.model,
                                 "request_prio": out.request.priority})
            return out
        finally:
            span.end()

    def route(self, given: RequestInput, access: ResponseAccess = ResponseAccess.NONE) -> Routed:
        """``submit`` for callers that cannot wait: a request flow control would hold is refused."""
        out = self.submit(given, access)
        if isinstance(out, Pending):
            out.cancel()
            raise Refused(503, "flow control holds this request and the caller cannot wait", dropped=SATURATED)
        return out

    def _submit(self, given: RequestInput, access: ResponseAccess,
                ready: Callable[[Routed | Refused], None] | None) -> Routed | Pending:
        arrived = time.perf_counter()
        key = self._authenticate(given)
        if self.models is not None:
            try:
                answer = models_answer(given.headers, given.path, self.models)
            except Refused as e:
                self._meter_refusal(given, key, e.status)
                raise
            if answer is not None:
                self._meter_refusal(given, key, answer.status)
                raise answer
        request = self._parse(given, key)
        if key is not None:
            request.tenant, request.objective = key.tenant, key.tier
            request.prepared[API_KEY] = key
            if key.concurrency is not None:
                try:
                    request.prepared[SLOT] = self.rate_limits.acquire(key, request)
                except Refused as e:
                    self._meter_refusal(given, key, e.status)
                    raise
        request.arrived = arrived
        request.body_bytes = len(given.body) if given.body is not None else _content_length(given.headers)
        self._apply_policies(request)
        m = self.metrics
        labels = m.request_labels(request.model, request.target_model,
                                  request.tenant or header(request.headers, FAIRNESS_ID), request.priority)
        m.request_started(labels)
        fetch = self._preparation(request, self.tokens.prepare(request) if self.tokens is not None else None)
        if fetch is None:
            return self._admit(request, given, access, labels, ready)
        pending = Preparing(request)
        pending.ready = ready

        async def prepared() -> None:
            try:
                await fetch()
            except Exception:  # a bug in a backend must not hang the request: it goes on without ids
                log.exception("token producer failed on request %s", request.request_id or "-")
            try:
                out = self._admit(request, given, access, labels, None)
            except Refused as e:
                pending.deliver(e)
                return
            if isinstance(out, Pending):
                pending.then(out)
            else:
                pending.deliver(out)

        pending.start(prepared())
        return pending

    def _preparation(self, request: InferenceRequest, first: Callable[[], Awaitable[None]] | None
                     ) -> Callable[[], Awaitable[None]] | None:
        """What must be awaited before admission: ``first`` (the token fetch), then each
        preparer's step, a preparer starting once the step before it is done (None: nothing)."""
        preparers = self.preparers
        if first is None:
            for i, p in enumerate(preparers):
                job = p.prepare(request, self.store.snapshot())
                if job is not None:
                    return self._then(request, job, preparers[i + 1:])
            return None
        return self._then(request, first, preparers)

    def _then(self, request: InferenceRequest, job: Callable[[], Awaitable[None]],
              rest: tuple[PreparesRequests, ...]) -> Callable[[], Awaitable[None]]:
        async def run() -> None:
            await job()
            for p in rest:
                more = p.prepare(request, self.store.snapshot())
                if more is not None:
                    await more()
        return run

    def _admit(self, request: InferenceRequest, given: RequestInput, access: ResponseAccess, labels: RequestLabels,
               ready: Callable[[Routed | Refused], None] | None) -> Routed | Pending:
        """Admission (or flow control) and scheduling, once the request has what it needs."""
        room = self.waiting
        if room is None:
            try:
                snapshot = self._candidates(given)
                refusal = self.admission.admit(request, snapshot)
                if refusal is not None:
                    raise refusal
            except Refused as e:
                raise self._refused(request, labels, e) from None
            return self._schedule(request, given, access, labels, snapshot, time.perf_counter())
        w = Waiting(room, given, access, request, labels, room.clock())
        try:
            if given.subset is not None and self.subset_filter:
                self._candidates(given)  # a hint no endpoint matches is refused now, not after a wait
            room.admit(w)
        except Refused as e:
            raise self._refused(request, labels, e) from None
        result = w.result
        if result is None:
            w.ready = ready
            return w
        if isinstance(result, Refused):
            raise result
        return result

    def _deliver(self, w: Waiting) -> Routed | Refused:
        """Schedule a request flow control dispatches, on the snapshot of now."""
        try:
            snapshot = self._candidates(w.given)
        except Refused as e:
            return self._refused(w.request, w.labels, e)
        try:
            routed = self._schedule(w.request, w.given, w.access, w.labels, snapshot, time.perf_counter(),
                                    read_usage=w.fairness is not None)
        except Refused as e:
            return e  # counted and logged where it was raised
        routed.queued = w.queued_seconds
        if w.fairness is not None:
            routed.flow = (w.labels.fairness, w.fairness)
        return routed

    def _prefill_estimate(self, w: Waiting) -> int:
        """The prompt tokens ``w`` would compute now where most of it is cached."""
        try:
            return self.scheduler.prefill_estimate(w.request, self._candidates(w.given))
        except Refused:
            return 0

    def _held_refused(self, w: Waiting, refusal: Refused) -> Refused:
        return self._refused(w.request, w.labels, refusal)

    def _candidates(self, given: RequestInput) -> Snapshot:
        snapshot = self.store.snapshot()
        if given.subset is not None and self.subset_filter:
            snapshot = _within(snapshot, given.subset)
        if self.ejections is not None:
            out = self.ejections.excluded()
            if out:
                kept = tuple(e for e in snapshot.endpoints if e.address not in out)
                if kept:  # every endpoint out: none is (a guess beats a refusal)
                    snapshot = replace(snapshot, endpoints=kept)
        return snapshot

    def _schedule(self, request: InferenceRequest, given: RequestInput, access: ResponseAccess,
                  labels: RequestLabels, snapshot: Snapshot, t0: float, read_usage: bool = False) -> Routed:
        m = self.metrics
        scheduler = self.scheduler
        for admitter in self.admitters:
            refusal = admitter.admit(request, snapshot)
            if refusal is not None:
                raise self._refused(request, labels, refusal)
        try:
            decision = scheduler.schedule(request, snapshot)
        except SchedulingError as e:
            m.scheduling_attempt(False, request.target_model or request.model, "")
            dropped = NO_ENDPOINTS if e.status == 503 else None
            raise self._refused(request, labels, Refused(e.status, e.message, dropped=dropped)) from None
        m.scheduling_attempt(True, request.target_model or request.model, decision.primary,
                             next((c.name for c in decision.candidates if c.address == decision.primary), ""))
        scheduler.committed(decision)
        # The prompt tokens the pod has to compute: the prompt less what a prefix scorer found
        # cached there (as the reference's in-flight load counts them).
        cycle = decision.cycle
        matched = (cycle.get(MATCHED_TOKENS) or {}).get(decision.primary, 0)
        tokens = max(0, prompt_tokens(cycle, request.prompt) - matched)
        prefill, prefill_tokens = decision.prefill, 0
        if prefill is not None:  # P/D: the prefill pod computes the prompt, the decode pod receives it
            matched = (prefill.cycle.get(MATCHED_TOKENS) or {}).get(prefill.primary, 0)
            prefill_tokens, tokens = max(0, prompt_tokens(prefill.cycle, request.prompt) - matched), 0
            self.store.acquire(prefill.primary, prefill_tokens)
            m.child(m.picks, prefill.primary).inc()
        self.store.acquire(decision.primary, tokens)
        t1 = time.perf_counter()
        m.scheduled(t1 - t0)
        m.request_processing.observe(t1 - (request.arrived or t0))
        m.child(m.picks, decision.primary).inc()
        m.request_running(labels, 1)
        routed = Routed(self, scheduler, request, decision, labels, t1)
        if self.shadow is not None:  # after the live pick is committed: it never waits for the candidates
            routed.shadows = self.shadow.observe(request, snapshot, decision)
            m.activity.picked(labels.model, decision, tuple((p.candidate.name, p.chose) for p in routed.shadows))
        else:
            m.activity.picked(labels.model, decision)
        routed.tokens = tokens
        routed.prefill_tokens = prefill_tokens
        inject = False
        if access is not ResponseAccess.NONE:  # the response series read its usage; plugins may want more
            key = request.prepared.get(API_KEY)
            # Tokens per minute and metering need the usage, streams included.
            metered = self.metering is not None or (isinstance(key, ApiKey) and key.tpm is not None)
            if scheduler.wants_usage or read_usage or metered or routed.shadows:
                inject = (access is ResponseAccess.INJECT and (scheduler.inject_usage or metered)
                          and wants_injection(request))
            routed.reader = UsageReader(strip=inject)
        if given.body is not None:
            routed.forward_body = mutated_body(request, inject)
        return routed

    def _authenticate(self, given: RequestInput) -> ApiKey | None:
        """The request's API key when keys are configured (Refused 401 otherwise), before anything else."""
        keys = self.keys
        if keys is None:
            return None
        key = None
        try:
            key = keys.check(given.headers)
            if key.rpm is not None or key.tpm is not None:
                self.rate_limits.admit(key)
            return key
        except Refused as e:
            self.metrics.request_refused(self.metrics.request_labels("", "", "", 0), e.status)
            log.info("request %s refused: %d %s", given.headers.get("x-request-id") or "-", e.status, e.message)
            self._meter_refusal(given, key, e.status)
            raise

    def _meter_refusal(self, given: RequestInput, key: ApiKey | None, status: int, model: str = "") -> None:
        """A request that ends before it is routed (refused, or answered here), for metering."""
        if self.metering is not None:
            self.metering.record(UsageRecord(given.headers.get("x-request-id", ""), key.tenant if key else "",
                                             key.key_id if key else "", model, "", status))

    def _parse(self, given: RequestInput, key: ApiKey | None = None) -> InferenceRequest:
        headers = given.headers
        request_id = headers.get("x-request-id") or ""
        path = route_path(given.path)
        try:
            if given.body is not None:
                parser = self.parsers.resolve(path)
                if parser is None:
                    raise Refused(400, f"no parser of requestHandler.parsers claims the path {path!r}")
                return parser.parse(request_id, path, headers, given.body)  # an empty body is refused here
            if given.prompt is not None or given.messages is not None:
                return from_fields(request_id, path, headers, given.model, given.prompt, given.messages)
            return headers_only(request_id, path, headers)
        except Refused as e:
            self.metrics.request_refused(self.metrics.request_labels("", "", "", 0), e.status)
            self._meter_refusal(given, key, e.status)
            raise

    def _apply_policies(self, request: InferenceRequest) -> None:
        """The objective's priority, and the model to send: the client's model-name-rewrite
        header if given, then an InferenceModelRewrite rule for the model overrides it (as the
        reference orders them)."""
        policies = self.policies
        headers = request.headers
        if not request.tenant:  # an API key's tier is its objective; the header is the client's own say
            request.objective = header(headers, OBJECTIVE)
        request.priority = policies.priority(request.objective)
        wanted = header(headers, MODEL_REWRITE)
        if wanted and request.model:
            request.target_model = wanted
        if request.model and (policies.exact or policies.generic):
            found = policies.rewrite_by(request.model, self.rng)
            if found is not None:
                rule, request.target_model = found
                self.metrics.rewrite_decided(rule, request.model, request.target_model)

    def _refused(self, request: InferenceRequest, labels: RequestLabels, refusal: Refused) -> Refused:
        self.metrics.request_refused(labels, refusal.status)
        slot = request.prepared.get(SLOT)
        if isinstance(slot, Slot):
            slot.release()
        if self.metering is not None:
            key = request.prepared.get(API_KEY)
            self.metering.record(UsageRecord(request.request_id, request.tenant,
                                             key.key_id if isinstance(key, ApiKey) else "", labels.model, "",
                                             refusal.status))
        log.warning("request %s refused: %d %s", request.request_id or "-", refusal.status, refusal.message)
        return refusal

    def prefilled(self, endpoint: str, tokens: int) -> None:
        self.store.prefilled(endpoint, tokens)
        if tokens and self.waiting is not None:
            self.waiting.pump()  # the pod's prefill work ahead shrank

    def prefill_stage_done(self, endpoint: str, tokens: int) -> None:
        """P/D: the prefill pod computed the prompt (the response started): it is free of it."""
        self.store.prefilled(endpoint, tokens)
        self.store.release(endpoint)
        if self.waiting is not None:
            self.waiting.pump()

    def finished(self, endpoint: str, labels: RequestLabels, started: float) -> None:
        self.store.release(endpoint)
        self.metrics.request_finished(labels, time.perf_counter() - started)
        if self.waiting is not None:
            self.waiting.pump()  # capacity freed

    def move(self, old: str, new: str) -> bool:
        """Move one in-flight request from ``old`` to ``new`` (False when ``new`` is not in the pool)."""
        if self.store.get(new) is None:
            return False
        self.store.release(old)
        self.store.acquire(new)
        return True

    def endpoint_removed(self, address: str) -> None:
        self.scheduler.endpoint_removed(address)
        if self.shadow is not None:
            self.shadow.endpoint_removed(address)


def _content_length(headers: Mapping[str, str]) -> int | None:
    value = headers.get("content-length")
    return int(value) if value is not None and value.isdigit() else None


def _host(address: str) -> str:
    return address.rpartition(":")[0] if ":" in address else address


def _within(snapshot: Snapshot, subset: tuple[str, ...]) -> Snapshot:
    """The snapshot narrowed to the subset hint's hosts (as the reference matches them: by host);
    Refused 503 when it leaves no endpoint."""
    hosts = {_host(a) for a in subset}
    endpoints = tuple(e for e in snapshot.endpoints if _host(e.address) in hosts)
    if not endpoints:
        raise Refused(503, "no endpoint of the pool is in the gateway's subset hint "
                           "(x-gateway-destination-endpoint-subset)", dropped=NO_ENDPOINTS)
    return replace(snapshot, endpoints=endpoints)
