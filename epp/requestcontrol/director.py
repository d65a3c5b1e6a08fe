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
from dataclasses import replace
from typing import Any

from epp.datastore.store import Datastore, Snapshot
from epp.flowcontrol.config import DEFAULT_DETECTOR
from epp.flowcontrol.controller import FlowSettings
from epp.flowcontrol.detectors import UtilizationDetector
from epp.observability.flowmetrics import FlowMetrics
from epp.observability.metrics import PickerMetrics, RequestLabels
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
from epp.requestcontrol.recorder import Outcome, Recorder
from epp.requestcontrol.refused import NO_ENDPOINTS, SATURATED, Refused
from epp.requestcontrol.routed import SLOT, RequestInput, ResponseAccess, Routed
from epp.requestcontrol.shadow import ShadowEvaluation
from epp.requestcontrol.tokens import Tokenizes
from epp.requestcontrol.usage import UsageReader, wants_injection
from epp.requestcontrol.waiting import Waiting, WaitingRoom
from epp.scheduling.contract import PreparesRequests
from epp.scheduling.framework import Scheduler
from epp.scheduling.params import Params
from epp.scheduling.types import MATCHED_TOKENS, SchedulingError, prompt_tokens

log = logging.getLogger("epp.director")


class Director:
    """Holds what a reload swaps (the scheduler, the policies, admission) and routes requests."""

    def __init__(self, store: Datastore, scheduler: Scheduler, metrics: PickerMetrics,
                 policies: RequestPolicies | None = None, admission: Admission | None = None,
                 rng: random.Random | None = None, subset_filter: bool = True, tracing: Tracing | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.clock = clock  # the waiting room's and the rate limits' (a virtual one in a replay)
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
        self.rate_limits = RateLimits(clock)  # the keys' requests and tokens per minute
        self.strip_keys = False  # remove the client's key headers before the request goes to a server
        self.upstream_auth: tuple[tuple[str, str], ...] = ()  # the servers' own key, set on every request
        self.ejections: Ejections | None = None  # the gateway's retries: endpoints out for a while
        self.metering: Metering | None = None  # usage counters and lines, per tenant, key, model and pod
        self.models: Callable[[], list[dict[str, Any]]] | None = None  # GET /v1/models, answered here
        self.shadow: ShadowEvaluation | None = None  # candidate configs scheduling sampled requests too
        self.recorder: Recorder | None = None  # finished requests as trace records (epp record)

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
                                       self._prefill_estimate, clock=self.clock)
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
        try:  # (what ends the request before it has labels is metered here; the rest in _refused)
            answer = models_answer(given.headers, given.path, self.models) if self.models is not None else None
            if answer is not None:
                raise answer
            request = self._parse(given)
            if key is not None:
                request.tenant, request.objective = key.tenant, key.tier
                request.prepared[API_KEY] = key
                if key.concurrency is not None:
                    request.prepared[SLOT] = self.rate_limits.acquire(key, request)
        except Refused as e:
            self._meter_refusal(given.headers.get("x-request-id", ""), key, e.status)
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

    def _prefill_estimate(self, w: Waiting) -> tuple[int, dict[str, int]]:
        """``w``'s prompt tokens and those cached on each endpoint holding some of it, now."""
        try:
            return self.scheduler.prefill_by_endpoint(w.request, self._candidates(w.given))
        except Refused:
            return 0, {}

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
        routed.tokens = tokens
        routed.prefill_tokens = prefill_tokens
        inject = False
        if access is not ResponseAccess.NONE:  # the response series read its usage; plugins may want more
            key = request.prepared.get(API_KEY)
            # Tokens per minute and metering need the usage, streams included.
            metered = self.metering is not None or (isinstance(key, ApiKey) and key.tpm is not None)
            routed.usage_required = bool(read_usage or metered or routed.shadows)
            if scheduler.wants_usage or read_usage or metered or routed.shadows:
                inject = (access is ResponseAccess.INJECT and (scheduler.inject_usage or metered)
                          and wants_injection(request))
            routed.reader = UsageReader(strip=inject)
        if given.body is not None:
            routed.forward_body = mutated_body(request, inject)
        recorder = self.recorder
        routed.watch_response = (routed.reader is not None or scheduler.watches_first_bytes or bool(routed.shadows)
                                 or self.waiting is not None or self.metering is not None
                                 or (recorder is not None and recorder.active))
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
            self._meter_refusal(given.headers.get("x-request-id", ""), key, e.status)
            raise

    def _meter_refusal(self, request_id: str, key: object, status: int, model: str = "") -> None:
        """A request that ends before it is routed (refused, or answered here), for metering."""
        if self.metering is not None:
            known = key if isinstance(key, ApiKey) else None
            self.metering.record(UsageRecord(request_id, known.tenant if known else "", known.key_id if known else "",
                                             model, "", status))

    def _parse(self, given: RequestInput) -> InferenceRequest:
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
        self._meter_refusal(request.request_id, request.prepared.get(API_KEY), refusal.status, labels.model)
        recorder = self.recorder
        if recorder is not None and recorder.active:  # refused requests were offered load too (a replay sends them)
            body, now = request.body, time.perf_counter()
            recorder.finished(request, Outcome(refusal.status, "", 0, 0, None, None, now - (request.arrived or now),
                                               body is not None and body.get("stream") is True))
        log.warning("request %s refused: %d %s", request.request_id or "-", refusal.status, refusal.message)
        return refusal

    def prefilled(self, endpoint: str, tokens: int, routed: Routed) -> None:
        """``routed``'s response started: the pod computed its prompt."""
        self.store.prefilled(endpoint, tokens)
        if self.waiting is not None:
            if not routed.done:
                self.waiting.started(routed)
            if tokens:
                self.waiting.pump()  # the pod's prefill work ahead shrank

    def prefill_stage_done(self, endpoint: str, tokens: int) -> None:
        """P/D: the prefill pod computed the prompt (the response started): it is free of it."""
        self.store.prefilled(endpoint, tokens)
        self.store.release(endpoint)
        if self.waiting is not None:
            self.waiting.pump()

    def finished(self, endpoint: str, labels: RequestLabels, started: float, routed: Routed) -> None:
        self.store.release(endpoint)
        self.metrics.request_finished(labels, time.perf_counter() - started)
        if self.waiting is not None:
            self.waiting.finished(routed)  # capacity freed

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
