"""The pick path shared by ext_proc and the Pick API: schedule, commit, count in flight."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

from epp.datastore.store import Datastore
from epp.observability.metrics import PickerMetrics
from epp.policies import OBJECTIVE_HEADER, RequestPolicies
from epp.request import InferenceRequest
from epp.scheduling.framework import Scheduler
from epp.scheduling.types import Decision


@dataclass(slots=True)
class Pick:
    """A committed decision; ``finish`` ends its in-flight accounting exactly once."""

    decision: Decision
    request: InferenceRequest
    started: float
    service: PickService
    scheduler: Scheduler  # the one that decided (a config reload may have replaced it since)
    labels: tuple[str, str]  # (model_name, target_model_name) as the metrics show them
    done: bool = False
    prefilled: bool = False

    @property
    def header_value(self) -> str:
        return ",".join(self.decision.endpoints)

    def observe_usage(self, cached_tokens: int) -> None:
        """The response reported how many prompt tokens the pod served from its cache."""
        self.scheduler.observe(self.decision, cached_tokens)

    def first_bytes(self) -> None:
        """The response's first body bytes arrived: the pod has finished this prompt's prefill."""
        if not self.prefilled:
            self.prefilled = True
            self.scheduler.prefill_done(self.decision)

    def finish(self) -> None:
        if not self.done:
            self.done = True
            self.first_bytes()
            self.service.finish(self)


class PickService:
    """Holds the current scheduler (swapped atomically on config reload) and request policies."""

    def __init__(self, store: Datastore, scheduler: Scheduler, metrics: PickerMetrics,
                 policies: RequestPolicies | None = None, rng: random.Random | None = None) -> None:
        self.store = store
        self.scheduler = scheduler
        self.metrics = metrics
        self.rng = rng or random.Random()
        self.policies = policies or RequestPolicies()

    @property
    def policies(self) -> RequestPolicies:
        return self._policies

    @policies.setter
    def policies(self, policies: RequestPolicies) -> None:
        self._policies = policies
        self.metrics.models.set_configured(policies.model_names())

    def labels(self, request: InferenceRequest) -> tuple[str, str]:
        """The request's model labels, bounded (clients choose the model string)."""
        models = self.metrics.models
        return models(request.model), models(request.target_model)

    def apply_policies(self, request: InferenceRequest) -> None:
        """The objective's priority, and the model rewrite (``target_model``) if a rule says so."""
        policies = self.policies
        request.objective = request.headers.get(OBJECTIVE_HEADER, "")
        request.priority = policies.priority(request.objective)
        if request.model and (policies.exact or policies.generic):
            target = policies.rewrite(request.model, self.rng)
            if target is not None:
                request.target_model = target
                self.metrics.child(self.metrics.rewrites, *self.labels(request)).inc()

    def pick(self, request: InferenceRequest) -> Pick:
        """Apply policies, schedule and commit; raises SchedulingError (503/429)."""
        self.apply_policies(request)
        m = self.metrics
        labels = self.labels(request)
        m.child(m.requests, *labels).inc()
        t0 = time.perf_counter()
        scheduler = self.scheduler
        decision = scheduler.schedule(request, self.store.snapshot())
        scheduler.record(decision)
        self.store.acquire(decision.primary)
        t1 = time.perf_counter()
        m.scheduler_e2e.observe(t1 - t0)
        m.child(m.picks, decision.primary).inc()
        return Pick(decision, request, t1, self, scheduler, labels)

    def refused(self, request: InferenceRequest, status: int) -> None:
        m = self.metrics
        m.child(m.errors, *self.labels(request), str(status)).inc()

    def finish(self, pick: Pick) -> None:
        self.store.release(pick.decision.primary)
        m = self.metrics
        m.child(m.duration, *pick.labels).observe(time.perf_counter() - pick.started)
