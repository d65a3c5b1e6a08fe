"""The ``flowControl`` section of an EndpointPickerConfig, read strictly (the reference's
apix/config/v1alpha1 FlowControlConfig and its loader's defaults).

``maxBytes`` / ``maxRequests`` are Kubernetes quantities ("1Gi", "500M", "1k", or a number; 0
or absent = no pool cap). ``defaultRequestTTL`` (60s) and ``noEndpointRequestTTL`` (follows
defaultRequestTTL) are durations, "0s" = no expiry. ``priorityBands[]`` and the two templates
take ``priority``, ``maxBytes``, ``maxRequests`` (0 = 1G / 5,000), ``fairnessPolicyRef`` and
``orderingPolicyRef``. ``usageLimitPolicyPluginRef`` and ``saturationDetector.pluginRef`` name
plugins; a reference to a default type that no plugin entry defines (utilization-detector,
static-usage-limit-policy, global-strict-fairness-policy, fcfs-ordering-policy) gets a default
instance, as the reference's loader registers one. ``enableEviction: true`` turns on in-flight
eviction of dispatched sheddable requests (epp.flowcontrol.eviction).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

from epp.durations import parse_duration
from epp.flowcontrol.controller import DEFAULT_TTL, BandSpec, FlowSettings
from epp.flowcontrol.eviction import EvictionPolicies
from epp.scheduling.params import show
from epp.scheduling.types import ConfigError

DEFAULT_DETECTOR = "utilization-detector"
DEFAULT_USAGE_LIMIT = "static-usage-limit-policy"
DEFAULT_FAIRNESS = "global-strict-fairness-policy"
DEFAULT_ORDERING = "fcfs-ordering-policy"
DEFAULT_EVICTION_FILTER = "sheddable-eviction-filter"
DEFAULT_EVICTION_ORDER = "priority-then-time-eviction-order-policy"
EVICTION_ROLES = (("eviction filter policy", DEFAULT_EVICTION_FILTER),
                  ("eviction ordering policy", DEFAULT_EVICTION_ORDER))
# The roles the section's references must have.
ROLE_OF_REF = {"fairnessPolicyRef": "fairness policy", "orderingPolicyRef": "ordering policy",
               "usageLimitPolicyPluginRef": "usage limit policy", "pluginRef": "saturation detector"}
FIELDS = {"maxBytes", "maxRequests", "defaultRequestTTL", "noEndpointRequestTTL", "defaultPriorityBand",
          "defaultNegativePriorityBand", "priorityBands", "usageLimitPolicyPluginRef", "saturationDetector",
          "enableEviction"}
BAND_FIELDS = {"priority", "maxBytes", "maxRequests", "fairnessPolicyRef", "orderingPolicyRef"}
_SUFFIXES: dict[str, int | Decimal] = {
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
    "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18, "m": Decimal("0.001"), "": 1}
_QUANTITY = re.compile(r"^([+-]?[0-9.]+(?:[eE][+-]?[0-9]+)?)(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E|m|)$")
MAX_QUANTITY = 2**62
_ZERO = re.compile(r"0+(\.0*)?(ns|us|ms|s|m|h)?")


def quantity(value: Any, path: str) -> int:
    """A Kubernetes resource quantity as a whole number (rounded up, as Quantity.Value())."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ConfigError(path, f"expected a quantity like 1Gi, 500M or 100, got {show(value)}")
    m = _QUANTITY.match(str(value).strip())
    if m is None:
        raise ConfigError(path, f"invalid quantity {show(value)} (e.g. 1Gi, 500M, 1k, 100)")
    try:
        n = Decimal(m.group(1)) * _SUFFIXES[m.group(2)]
    except InvalidOperation:
        raise ConfigError(path, f"invalid quantity {show(value)}") from None
    if n < 0:
        raise ConfigError(path, f"must be non-negative, got {show(value)}")
    if n > MAX_QUANTITY:
        raise ConfigError(path, f"too large: {show(value)}")
    whole = int(n.to_integral_value(rounding="ROUND_CEILING"))
    return whole


def duration_or_zero(value: Any, path: str) -> float:
    """A duration ("30s", "500ms"); "0s" or 0 means none."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ConfigError(path, f"expected a duration like '30s', got {show(value)}")
    if isinstance(value, str):
        text = value.strip()
        if _ZERO.fullmatch(text):
            return 0.0
        try:
            return parse_duration(text)
        except ValueError as e:
            raise ConfigError(path, str(e)) from None
    if value < 0 or value != value or value == float("inf"):
        raise ConfigError(path, f"expected a non-negative duration, got {show(value)}")
    return float(value)


@dataclass(frozen=True, slots=True)
class BandPlan:
    max_bytes: int = 0
    max_requests: int = 0
    fairness_ref: str | None = None
    ordering_ref: str | None = None


@dataclass(frozen=True, slots=True)
class FlowPlan:
    """The section, validated; ``settings`` resolves its references to plugin instances."""

    detector_ref: str
    usage_limit_ref: str = DEFAULT_USAGE_LIMIT
    default_ttl: float = DEFAULT_TTL
    no_endpoint_ttl: float = DEFAULT_TTL
    max_bytes: int = 0
    max_requests: int = 0
    bands: Mapping[int, BandPlan] = field(default_factory=dict)
    default_band: BandPlan = BandPlan()
    default_negative_band: BandPlan | None = None
    eviction: bool = False
    # The eviction policies' plugin names (an entry of each role, else the defaults).
    eviction_refs: tuple[str, str] = (DEFAULT_EVICTION_FILTER, DEFAULT_EVICTION_ORDER)

    def refs(self) -> set[str]:
        out = {self.detector_ref, self.usage_limit_ref, DEFAULT_FAIRNESS, DEFAULT_ORDERING}
        if self.eviction:
            out.update(self.eviction_refs)
        for b in (*self.bands.values(), self.default_band, self.default_negative_band):
            if b is not None:
                out.update(r for r in (b.fairness_ref, b.ordering_ref) if r)
        return out

    def settings(self, instance: Callable[[str], Any]) -> FlowSettings:
        def band(b: BandPlan) -> BandSpec:
            return BandSpec(b.max_bytes, b.max_requests, instance(b.fairness_ref) if b.fairness_ref else None,
                            instance(b.ordering_ref) if b.ordering_ref else None)

        return FlowSettings(instance(self.detector_ref), instance(self.usage_limit_ref), instance(DEFAULT_FAIRNESS),
                            instance(DEFAULT_ORDERING), self.default_ttl, self.no_endpoint_ttl, self.max_bytes,
                            self.max_requests, {p: band(b) for p, b in self.bands.items()}, band(self.default_band),
                            band(self.default_negative_band) if self.default_negative_band else None,
                            EvictionPolicies(instance(self.eviction_refs[0]), instance(self.eviction_refs[1]))
                            if self.eviction else None)


def parse_flow_control(raw: Mapping[str, Any], role_of: Callable[[str], str | None], detector_ref: str) -> FlowPlan:
    """``raw`` is the ``flowControl`` mapping; ``role_of(name)`` the role of a plugin entry (None:
    no entry of that name); ``detector_ref`` the detector already chosen (the section's own
    ``saturationDetector`` is read by the caller, as the legacy path uses it too)."""
    for k in raw:
        if k not in FIELDS:
            raise ConfigError(f"flowControl.{k}", f"unknown field (allowed: {', '.join(sorted(FIELDS))})")
    evict = raw.get("enableEviction", False)
    if not isinstance(evict, bool):
        raise ConfigError("flowControl.enableEviction", f"expected true or false, got {show(evict)}")

    def ref(value: Any, path: str, key: str, default: str | None) -> str | None:
        if value is None or value == "":
            return default
        if not isinstance(value, str):
            raise ConfigError(path, f"expected a plugin name, got {show(value)}")
        _check_ref(value, path, ROLE_OF_REF[key], role_of)
        return value

    def band(b: Any, path: str, template: bool) -> tuple[int | None, BandPlan]:
        if not isinstance(b, Mapping):
            raise ConfigError(path, f"expected a mapping, got {type(b).__name__}")
        for k in b:
            if k not in BAND_FIELDS:
                raise ConfigError(f"{path}.{k}", f"unknown field (allowed: {', '.join(sorted(BAND_FIELDS))})")
        priority = b.get("priority")
        if priority is None and not template:
            raise ConfigError(f"{path}.priority", "required")
        if priority is not None and (isinstance(priority, bool) or not isinstance(priority, int)):
            raise ConfigError(f"{path}.priority", f"expected an integer, got {show(priority)}")
        return priority, BandPlan(
            quantity(b["maxBytes"], f"{path}.maxBytes") if b.get("maxBytes") is not None else 0,
            quantity(b["maxRequests"], f"{path}.maxRequests") if b.get("maxRequests") is not None else 0,
            ref(b.get("fairnessPolicyRef"), f"{path}.fairnessPolicyRef", "fairnessPolicyRef", None),
            ref(b.get("orderingPolicyRef"), f"{path}.orderingPolicyRef", "orderingPolicyRef", None))

    bands: dict[int, BandPlan] = {}
    listed = raw.get("priorityBands") or []
    if not isinstance(listed, list):
        raise ConfigError("flowControl.priorityBands", f"expected a list, got {type(listed).__name__}")
    for i, b in enumerate(listed):
        p, plan = band(b, f"flowControl.priorityBands[{i}]", template=False)
        assert p is not None
        if p in bands:
            raise ConfigError(f"flowControl.priorityBands[{i}].priority", f"priority {p} is configured twice")
        bands[p] = plan
    ttl = duration_or_zero(raw["defaultRequestTTL"], "flowControl.defaultRequestTTL") \
        if raw.get("defaultRequestTTL") is not None else DEFAULT_TTL
    no_ep = duration_or_zero(raw["noEndpointRequestTTL"], "flowControl.noEndpointRequestTTL") \
        if raw.get("noEndpointRequestTTL") is not None else ttl
    default_band = band(raw["defaultPriorityBand"], "flowControl.defaultPriorityBand", True)[1] \
        if raw.get("defaultPriorityBand") is not None else BandPlan()
    negative = band(raw["defaultNegativePriorityBand"], "flowControl.defaultNegativePriorityBand", True)[1] \
        if raw.get("defaultNegativePriorityBand") is not None else None
    usage = ref(raw.get("usageLimitPolicyPluginRef"), "flowControl.usageLimitPolicyPluginRef",
                "usageLimitPolicyPluginRef", DEFAULT_USAGE_LIMIT)
    assert usage is not None
    return FlowPlan(detector_ref, usage, ttl, no_ep,
                    quantity(raw["maxBytes"], "flowControl.maxBytes") if raw.get("maxBytes") is not None else 0,
                    quantity(raw["maxRequests"], "flowControl.maxRequests") if raw.get("maxRequests") is not None
                    else 0, bands, default_band, negative, evict)


def _check_ref(name: str, path: str, role: str, role_of: Callable[[str], str | None]) -> None:
    found = role_of(name)
    if found is None:
        if name in (DEFAULT_DETECTOR, DEFAULT_USAGE_LIMIT, DEFAULT_FAIRNESS, DEFAULT_ORDERING, DEFAULT_EVICTION_FILTER,
                    DEFAULT_EVICTION_ORDER):
            return  # a default instance is made
        raise ConfigError(path, f"no plugin named {show(name)} in plugins")
    if found != role:
        raise ConfigError(path, f"{show(name)} is a {found}, not a {role}")


def detector_ref(raw: Mapping[str, Any] | None, path: str, role_of: Callable[[str], str | None]) -> str:
    """A ``saturationDetector: {pluginRef}`` mapping's plugin (the default detector when absent)."""
    if raw is None:
        return DEFAULT_DETECTOR
    if not isinstance(raw, Mapping):
        raise ConfigError(path, f"expected a mapping, got {type(raw).__name__}")
    for k in raw:
        if k != "pluginRef":
            raise ConfigError(f"{path}.{k}", "unknown field (allowed: pluginRef)")
    name = raw.get("pluginRef") or DEFAULT_DETECTOR
    if not isinstance(name, str):
        raise ConfigError(f"{path}.pluginRef", f"expected a plugin name, got {show(name)}")
    _check_ref(name, f"{path}.pluginRef", "saturation detector", role_of)
    return name
