"""The reference's label filters on the endpoints' pod labels, and its basic sample config."""

from __future__ import annotations

from pathlib import Path

import pytest

from epp.config import load_config, parse_config
from epp.datastore.endpoint import EndpointState, EngineSignals
from epp.datastore.store import Snapshot
from epp.request import InferenceRequest
from epp.scheduling.types import ConfigError, CycleState, SchedulingError

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "reference"
ROLES = {"plain": None, "decode": "decode", "prefill": "prefill", "both": "both", "pd": "prefill-decode",
         "encoder": "encode", "ep": "encode-prefill"}


def labels(i: int, role: str | None) -> dict[str, str]:
    return {"llm-d.ai/role": role, "tier": "gold" if i % 2 else "std"} if role else {"tier": "std"}


def pool() -> list[EndpointState]:
    return [EndpointState(f"{name}:8000", EngineSignals(), scraped_at=10.0, labels=labels(i, role))
            for i, (name, role) in enumerate(ROLES.items())]


def passing(plugin_yaml: str) -> set[str]:
    text = f"""apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- name: f
{plugin_yaml}
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: f
"""
    s, _ = parse_config(text).build()
    f = s.profile.filters[0]
    eps = pool()
    return {c.address.split(":")[0] for c in f.filter(InferenceRequest("r", "/v1/completions"),
                                                      Snapshot(tuple(eps), {}, {}, 10.0, 2.0), eps, CycleState())}


@pytest.mark.parametrize(("plugin", "names"), [
    ("  type: decode-filter", {"plain", "decode", "both", "pd"}),
    ("  type: prefill-filter", {"prefill", "both", "pd", "ep"}),
    ("  type: encode-filter", {"encoder", "ep"}),
    ("  type: by-label\n  parameters: {label: llm-d.ai/role, validValues: [prefill], allowsNoLabel: true}",
     {"plain", "prefill"}),
    ("  type: label-selector-filter\n  parameters: {matchLabels: {tier: gold}}", {"decode", "both", "encoder"}),
    ("  type: by-label-selector\n  parameters: {matchExpressions: [{key: llm-d.ai/role, operator: NotIn, "
     "values: [encode, encode-prefill]}, {key: llm-d.ai/role, operator: Exists}]}",
     {"decode", "prefill", "both", "pd"}),
    ("  type: label-selector-filter\n  parameters: {matchExpressions: [{key: llm-d.ai/role, operator: DoesNotExist}]}",
     {"plain"}),
])
def test_label_filters_keep_what_the_reference_keeps(plugin: str, names: set[str]) -> None:
    assert passing(plugin) == names


@pytest.mark.parametrize(("plugin", "message"), [
    ("  type: by-label\n  parameters: {validValues: [a]}", "label: required"),
    ("  type: by-label\n  parameters: {label: x}", "give validValues"),
    ("  type: label-selector-filter\n  parameters: {matchExpressions: [{key: a, operator: Near}]}", "operator"),
    ("  type: label-selector-filter\n  parameters: {matchExpressions: [{key: a, operator: In}]}", "In needs values"),
    ("  type: decode-filter\n  parameters: {label: x}", "label: unknown parameter"),
])
def test_label_filter_parameters_are_strict(plugin: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        passing(plugin)


def test_the_references_basic_sample_config_loads_and_routes_to_decode_pods_only() -> None:
    s, _ = load_config(str(FIXTURES / "epp-config.yaml")).build()
    assert [f.type_name for f in s.profile.filters] == ["decode-filter"]
    eps = pool()
    snap = Snapshot(tuple(eps), {}, {}, 10.0, 2.0)
    for i in range(20):
        assert s.schedule(InferenceRequest("r", "/v1/completions", model="m", prompt=f"p{i}"), snap).primary.split(
            ":")[0] in {"plain", "decode", "both", "pd"}
    prefill_only = tuple(e for e in eps if e.address.startswith(("prefill", "encoder")))
    with pytest.raises(SchedulingError, match="decode-filter"):
        s.schedule(InferenceRequest("r", "/v1/completions"), Snapshot(prefill_only, {}, {}, 10.0, 2.0))


def test_load_aware_scorer_as_the_reference_scores() -> None:
    s, _ = load_config(str(FIXTURES / "epp-estimate-prefix-cache-config.yaml")).build()
    scorer = next(sc for sc, _ in s.profile.scorers if sc.type_name == "load-aware-scorer")
    eps = [EndpointState(f"e{q}", EngineSignals(waiting=q), scraped_at=10.0) for q in (0, 1, 64, 128, 500)]
    scores = scorer.score(InferenceRequest("r", "/v1/completions"), Snapshot(tuple(eps), {}, {}, 10.0, 2.0), eps,
                          CycleState())
    assert scores == [0.5, pytest.approx(0.5 * (1 - 1 / 128)), 0.25, 0.0, 0.0]
    for threshold, expected in (("0", 128.0), ("-3", 128.0), ("10", 10.0)):
        text = ("apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\nplugins:\n- type: load-aware-scorer\n"
                f"  parameters: {{threshold: {threshold}}}\nschedulingProfiles:\n- name: d\n  plugins:\n"
                "  - pluginRef: load-aware-scorer\n")
        built, _ = parse_config(text).build()
        assert built.profile.scorers[0][0].threshold == expected  # type: ignore[attr-defined]


def active(params: str) -> object:
    text = ("apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\nplugins:\n- type: active-request-scorer\n"
            f"  parameters: {params}\nschedulingProfiles:\n- name: d\n  plugins:\n"
            "  - pluginRef: active-request-scorer\n")
    built, _ = parse_config(text).build()
    return built.profile.scorers[0][0]


def test_active_request_scorer_as_the_reference_scores(caplog: pytest.LogCaptureFixture) -> None:
    eps = [EndpointState(f"e{i}", EngineSignals(), scraped_at=10.0) for i in range(4)]
    snap = Snapshot(tuple(eps), {"e0": 0, "e1": 1, "e2": 2, "e3": 4}, {}, 10.0, 2.0)
    req = InferenceRequest("r", "/v1/completions")
    assert active("{}").score(req, snap, eps, CycleState()) == [1.0, 0.75, 0.5, 0.0]  # type: ignore[attr-defined]
    assert active("{idleThreshold: 1, maxBusyScore: 0.5}").score(  # type: ignore[attr-defined]
        req, snap, eps, CycleState()) == [1.0, 1.0, 0.25, 0.0]
    active("{requestTimeout: 2m}")  # deprecated in the reference, and ignored there too
    assert "requestTimeout is deprecated and ignored" in caplog.text
    for bad, message in (("{maxBusyScore: 2}", "maxBusyScore: must be <= 1.0"),
                         ("{inFlightLoadProducerName: p}", "not supported by epp")):
        with pytest.raises(ConfigError, match=message):
            active(bad)


def test_the_conformance_suites_header_filter_keeps_the_endpoints_the_header_names() -> None:
    from epp.scheduling.filters import HeaderBasedTestingFilter
    from epp.scheduling.params import Params

    f = HeaderBasedTestingFilter("t", Params({}, "t"))
    eps = [EndpointState(a, EngineSignals(), scraped_at=0.0)
           for a in ("10.0.0.7:8000", "10.0.0.7:8001", "10.0.0.8:3002", "[fd00::1]:3000")]
    snap = Snapshot(tuple(eps), {}, {}, 0.0, 2.0)

    def kept(value: str | None) -> list[str]:
        headers = {"test-epp-endpoint-selection": value} if value is not None else {}
        req = InferenceRequest("id", "/v1/completions", model="m", headers=headers)
        return [e.address for e in f.filter(req, snap, eps, CycleState())]

    assert kept("10.0.0.8:3002, 10.0.0.7:8000") == ["10.0.0.8:3002", "10.0.0.7:8000"]  # header order
    assert kept("10.0.0.7") == ["10.0.0.7:8001"]  # a bare IP: one endpoint of it
    assert kept("10.0.0.7:8000,10.0.0.7:8001") == ["10.0.0.7:8000"]  # one per IP, as the reference
    assert kept("[fd00::1]:3000") == ["[fd00::1]:3000"] == kept("fd00::1")
    assert kept("10.0.0.9") == [] and kept("") == [] and kept(None) == []
    with pytest.raises(ConfigError, match=r"plugins\[0\]\.parameters\.x: unknown parameter"):
        parse_config("""apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- {type: header-based-testing-filter, parameters: {x: 1}}
schedulingProfiles:
- {name: default, plugins: [{pluginRef: header-based-testing-filter}]}
""")
