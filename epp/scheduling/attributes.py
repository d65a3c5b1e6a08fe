"""The reference's generic attribute plugins, on the endpoint attributes an attribute extractor
publishes (``dcgm-extractor``'s ``GPUUtilization``, 0..1):

- ``endpoint-attribute-filter``: keeps the candidates whose ``attribute`` compares true against
  ``algorithm.threshold`` (``operator`` LessThan, LessThanOrEqual, GreaterThan,
  GreaterThanOrEqual, Equal, NotEqual; ``value``); ``onMissing`` Pass (default) or Fail for a
  candidate without it; ``fallbackOnEmpty`` keeps everyone when none passes.
- ``endpoint-attribute-scorer``: ``attributeKey`` scored ``linear_lower_is_better`` or
  ``linear_higher_is_better``, normalised over ``fixedRange`` {min, max} (clamped) or, by default
  (``adaptiveRange``), over the candidates' own min..max (all equal: 1); a candidate without the
  attribute scores 0.

``producer`` names the extractor type that publishes the attribute. The reference's default
(the core metrics extractor's custom metrics) is refused: epp does not read custom metrics.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import ClassVar

from epp.datastore.endpoint import EndpointState
from epp.datastore.store import Snapshot
from epp.request import InferenceRequest
from epp.scheduling.contract import Filter, Scorer
from epp.scheduling.params import Params
from epp.scheduling.types import ConfigError, CycleState

OPERATORS: dict[str, Callable[[float, float], bool]] = {
    "LessThan": operator.lt, "LessThanOrEqual": operator.le, "GreaterThan": operator.gt,
    "GreaterThanOrEqual": operator.ge, "Equal": operator.eq, "NotEqual": operator.ne,
}
ATTRIBUTE_PRODUCERS = {"dcgm-extractor": ("GPUUtilization",)}  # extractor type -> the attributes it publishes


def attribute_key(params: Params, name_key: str) -> str:
    """``Attribute/producer`` from the plugin's attribute name and ``producer``."""
    attribute = params.text(name_key) or ""
    if not attribute:
        raise ConfigError(f"{params.path}.{name_key}", "required")
    producer = params.text("producer")
    if producer is None:
        raise ConfigError(f"{params.path}.producer", "required in epp: the reference's default (the core metrics "
                                                     "extractor's customMetrics) is not supported by epp")
    known = ATTRIBUTE_PRODUCERS.get(producer)
    if known is None:
        raise ConfigError(f"{params.path}.producer", f"not supported by epp ({producer!r} publishes no attribute epp "
                                                     f"reads; known: {', '.join(ATTRIBUTE_PRODUCERS)})")
    if attribute not in known:
        raise ConfigError(f"{params.path}.{name_key}", f"{producer} publishes {', '.join(known)}, not {attribute!r}")
    return f"{attribute}/{producer}"


class EndpointAttributeFilter(Filter):
    type_name: ClassVar[str] = "endpoint-attribute-filter"

    def __init__(self, name: str, params: Params) -> None:
        self.name = name
        self.key = attribute_key(params, "attribute")
        self.pass_missing = params.text("onMissing", "Pass", choices=("Pass", "Fail")) == "Pass"
        self.fallback = params.bool("fallbackOnEmpty", False)
        algo = params.section("algorithm") or Params({}, f"{params.path}.algorithm")
        algo.text("type", "threshold", choices=("threshold",))
        th = algo.section("threshold")
        if th is None:
            raise ConfigError(f"{algo.path}.threshold", "required with type threshold")
        op = th.text("operator", choices=tuple(OPERATORS))
        if op is None:
            raise ConfigError(f"{th.path}.operator", "required")
        self.compare = OPERATORS[op]
        self.value = th.float("value", 0.0)
        th.done()
        algo.done()
        params.done()

    def filter(self, request: InferenceRequest, snapshot: Snapshot, candidates: list[EndpointState],
               cycle: CycleState) -> list[EndpointState]:
        kept = []
        for c in candidates:
            v = c.attributes.get(self.key)
            if (self.pass_missing if v is None else self.compare(v, self.value)):
                kept.append(c)
        return candidates if not kept and self.fallback else kept


class EndpointAttributeScorer(Scorer):
    type_name: ClassVar[str] = "endpoint-attribute-scorer"

    def __init__(self, name: str, params: Params) -> None:
        self.name = name
        self.key = attribute_key(params, "attributeKey")
        algo = params.section("algorithm") or Params({}, f"{params.path}.algorithm")
        kind = algo.text("type", choices=("linear_lower_is_better", "linear_higher_is_better"))
        if kind is None:
            raise ConfigError(f"{algo.path}.type", "required: linear_lower_is_better or linear_higher_is_better")
        self.lower_better = kind == "linear_lower_is_better"
        norm = algo.section("normalization") or Params({}, f"{algo.path}.normalization")
        fixed, adaptive = norm.section("fixedRange"), norm.section("adaptiveRange")
        if fixed is not None and adaptive is not None:
            raise ConfigError(norm.path, "at most one of fixedRange and adaptiveRange")
        self.range: tuple[float, float] | None = None
        if fixed is not None:
            lo, hi = fixed.float("min", 0.0), fixed.float("max", 0.0)
            fixed.done()
            if lo >= hi:
                raise ConfigError(f"{fixed.path}", f"needs min < max, got min {lo:g}, max {hi:g}")
            self.range = (lo, hi)
        if adaptive is not None:
            adaptive.done()
        norm.done()
        algo.done()
        params.done()

    def score(self, request: InferenceRequest, snapshot: Snapshot, candidates: list[EndpointState],
              cycle: CycleState) -> list[float]:
        values = [c.attributes.get(self.key) for c in candidates]
        if self.range is not None:
            lo, hi = self.range
        else:
            seen = [v for v in values if v is not None]
            if not seen:
                return [0.0] * len(candidates)
            lo, hi = min(seen), max(seen)
        out = []
        for v in values:
            if v is None:
                out.append(0.0)
            elif hi == lo:
                out.append(1.0)
            else:
                x = min(1.0, max(0.0, (v - lo) / (hi - lo)))
                out.append(1.0 - x if self.lower_better else x)
        return out


ATTRIBUTE_PLUGINS = (EndpointAttributeFilter, EndpointAttributeScorer)
