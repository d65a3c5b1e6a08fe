"""The reference's label filters: keep the candidates whose pod labels say they may serve.

- ``decode-filter`` / ``prefill-filter`` / ``encode-filter``: the pod's ``llm-d.ai/role`` label
  names a role that includes the stage (``both``, ``prefill-decode``, ...); a pod without the
  label passes the decode filter only (as in the reference: an unlabelled pod is a plain server).
- ``by-label`` (deprecated in the reference, still read): ``label``, ``validValues``,
  ``allowsNoLabel``.
- ``label-selector-filter`` (and its deprecated name ``by-label-selector``): a Kubernetes label
  selector, ``matchLabels`` and ``matchExpressions`` (In, NotIn, Exists, DoesNotExist).
- ``header-based-testing-filter``: the conformance suite's, by the ``test-epp-endpoint-selection``
  request header.

Labels come from the endpoints' pods (Kubernetes discovery); endpoints from a list or a file have
none.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import ClassVar

from epp.datastore.endpoint import EndpointState
from epp.datastore.store import Snapshot
from epp.request import InferenceRequest
from epp.scheduling.contract import Filter
from epp.scheduling.params import Params
from epp.scheduling.types import ConfigError, CycleState

ROLE_LABEL = "llm-d.ai/role"


class _ByLabel(Filter):
    """Pods whose ``label`` is one of ``values``, and those without it when ``allows_no_label``."""

    label: str = ROLE_LABEL
    values: frozenset[str] = frozenset()
    allows_no_label: bool = False

    def filter(self, request: InferenceRequest, snapshot: Snapshot, candidates: list[EndpointState],
               cycle: CycleState) -> list[EndpointState]:
        label, values, bare = self.label, self.values, self.allows_no_label
        return [c for c in candidates if (c.labels.get(label) in values) or (bare and label not in c.labels)]


class _Role(_ByLabel):
    def __init__(self, name: str, params: Params) -> None:
        self.name = name
        params.done()


class DecodeFilter(_Role):
    type_name: ClassVar[str] = "decode-filter"
    values = frozenset({"decode", "prefill-decode", "both", "encode-prefill-decode"})
    allows_no_label = True


class PrefillFilter(_Role):
    type_name: ClassVar[str] = "prefill-filter"
    values = frozenset({"prefill", "encode-prefill", "prefill-decode", "both", "encode-prefill-decode"})


class EncodeFilter(_Role):
    type_name: ClassVar[str] = "encode-filter"
    values = frozenset({"encode", "encode-prefill", "encode-prefill-decode"})


class ByLabelFilter(_ByLabel):
    type_name: ClassVar[str] = "by-label"

    def __init__(self, name: str, params: Params) -> None:
        self.name = name
        self.label = params.text("label") or ""
        if not self.label:
            raise ConfigError(f"{params.path}.label", "required")
        self.values = frozenset(params.str_map("validValues"))
        self.allows_no_label = params.bool("allowsNoLabel", False)
        params.done()
        if not self.values and not self.allows_no_label:
            raise ConfigError(f"{params.path}.validValues", "give validValues, or allowsNoLabel: true")


_OPERATORS: Mapping[str, Callable[[Mapping[str, str], str, frozenset[str]], bool]] = {
    "In": lambda labels, key, values: labels.get(key) in values,
    "NotIn": lambda labels, key, values: labels.get(key) not in values,
    "Exists": lambda labels, key, values: key in labels,
    "DoesNotExist": lambda labels, key, values: key not in labels,
}


class LabelSelectorFilter(Filter):
    type_name: ClassVar[str] = "label-selector-filter"

    def __init__(self, name: str, params: Params) -> None:
        self.name = name
        self.match_labels = params.str_map("matchLabels")
        self.expressions: list[tuple[str, str, frozenset[str]]] = []
        for p in params.sections("matchExpressions"):
            key = p.text("key") or ""
            op = p.text("operator") or ""
            values = frozenset(p.str_map("values"))
            if not key:
                raise ConfigError(f"{p.path}.key", "required")
            if op not in _OPERATORS:
                raise ConfigError(f"{p.path}.operator", f"expected one of {', '.join(_OPERATORS)}, got {op!r}")
            if (op in ("In", "NotIn")) != bool(values):
                raise ConfigError(f"{p.path}.values", f"{op} {'needs' if op in ('In', 'NotIn') else 'takes no'} "
                                                      "values")
            p.done()
            self.expressions.append((key, op, values))
        params.done()

    def filter(self, request: InferenceRequest, snapshot: Snapshot, candidates: list[EndpointState],
               cycle: CycleState) -> list[EndpointState]:
        return [c for c in candidates if self._matches(c.labels)]

    def _matches(self, labels: Mapping[str, str]) -> bool:
        if any(labels.get(k) != v for k, v in self.match_labels.items()):
            return False
        return all(_OPERATORS[op](labels, key, values) for key, op, values in self.expressions)


class ByLabelSelectorFilter(LabelSelectorFilter):
    """The deprecated name of ``label-selector-filter``."""

    type_name: ClassVar[str] = "by-label-selector"


TEST_SELECTION_HEADER = "test-epp-endpoint-selection"


def _host_port(address: str) -> tuple[str, str]:
    """``ip:port``, ``[v6]:port``, a bare ip or ``[v6]`` -> (ip without brackets, port or "")."""
    a = address.strip()
    if a.startswith("["):
        host, _, rest = a[1:].partition("]")
        return host, rest[1:] if rest.startswith(":") else ""
    if a.count(":") == 1:
        host, _, port = a.partition(":")
        return host, port
    return a, ""  # a bare IPv4, or a bare IPv6 without brackets


class HeaderBasedTestingFilter(Filter):
    """The reference's ``header-based-testing-filter`` (what the Inference Extension conformance
    suite configures): only the endpoints the request's ``test-epp-endpoint-selection`` header
    names (``ip`` or ``ip:port``, comma separated, in that order, one per IP); none without it."""

    type_name: ClassVar[str] = "header-based-testing-filter"

    def __init__(self, name: str, params: Params) -> None:
        self.name = name
        params.done()

    def filter(self, request: InferenceRequest, snapshot: Snapshot, candidates: list[EndpointState],
               cycle: CycleState) -> list[EndpointState]:
        value = request.headers.get(TEST_SELECTION_HEADER, "")
        if not value.strip():
            return []
        by_ip: dict[str, EndpointState] = {}
        by_host_port: dict[tuple[str, str], EndpointState] = {}
        for c in candidates:
            host, port = _host_port(c.address)
            by_ip[host] = c
            if port:
                by_host_port[(host, port)] = c
        kept: list[EndpointState] = []
        seen: set[str] = set()
        for item in value.split(","):
            if not item.strip():
                continue
            host, port = _host_port(item)
            e = by_host_port.get((host, port)) if port else by_ip.get(host)
            if e is not None:
                ip = _host_port(e.address)[0]
                if ip not in seen:
                    seen.add(ip)
                    kept.append(e)
        return kept


FILTERS = (DecodeFilter, PrefillFilter, EncodeFilter, ByLabelFilter, LabelSelectorFilter, ByLabelSelectorFilter,
           HeaderBasedTestingFilter)
