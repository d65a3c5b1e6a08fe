"""P/D disaggregation: the reference's disagg-profile-handler, its deciders, the two stages in the
scheduler and the loader's checks (pure, on snapshots)."""

from __future__ import annotations

from pathlib import Path

import pytest

from epp.config import load_config, parse_config
from epp.datastore.endpoint import EndpointState, EngineSignals
from epp.datastore.store import Snapshot
from epp.request import InferenceRequest
from epp.scheduling.disagg import AlwaysDisaggPDDecider, DisaggProfileHandler, PrefixBasedPDDecider
from epp.scheduling.params import Params
from epp.scheduling.types import ConfigError, Decision, SchedulingError

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "reference"
ROLE = "llm-d.ai/role"
PD = (Path(__file__).resolve().parents[1] / "fixtures" / "pd-config.yaml").read_text()


def pool(*roles: tuple[str, str]) -> Snapshot:
    eps = tuple(EndpointState(a, EngineSignals(), scraped_at=1.0, labels={ROLE: r} if r else {}) for a, r in roles)
    return Snapshot(eps, {}, {}, 1.0, 2.0)


def req(prompt: str) -> InferenceRequest:
    return InferenceRequest("r", "/v1/completions", model="m", prompt=prompt)


FLEET = pool(("p1:8000", "prefill"), ("p2:8000", "prefill"), ("d1:8000", "decode"), ("d2:8000", "decode"))
LONG = "a long document about the quarterly results " * 200  # ~2,200 tokens


def test_a_long_uncached_prompt_is_prefilled_on_a_prefill_pod_and_decoded_on_a_decode_pod() -> None:
    s, _ = parse_config(PD).build()
    d = s.schedule(req(LONG), FLEET)
    assert d.primary.startswith("d") and d.prefill is not None and d.prefill.primary.startswith("p")
    assert d.request_headers == (("x-prefiller-host-port", d.prefill.primary),)
    s.committed(d)  # both stages' prefix scorers record the prompt: on the prefill and on the decode pod
    again = s.schedule(req(LONG + " and a question"), FLEET)
    assert again.primary == d.primary and again.prefill is None  # cached on the decode pod now
    short = s.schedule(req("hi there"), FLEET)
    assert short.prefill is None and short.request_headers == ()


def test_without_a_prefill_pod_the_decode_pod_computes_the_prompt() -> None:
    s, _ = parse_config(PD).build()
    d = s.schedule(req(LONG), pool(("d1:8000", "decode")))
    assert d.prefill is None and "not disaggregated" in d.note
    with pytest.raises(SchedulingError):
        s.schedule(req(LONG), pool(("p1:8000", "prefill")))  # no decode pod: refused (503)


def test_the_prefix_decider_follows_the_references_thresholds() -> None:
    decider = PrefixBasedPDDecider("d", Params({"nonCachedTokens": 100, "promptTokens": 1000}, "p"))
    s, _ = parse_config(PD).build()
    d = s._schedule(req(LONG), FLEET)
    assert decider.disaggregate(req(LONG), d)
    assert not decider.disaggregate(req("short " * 100), s._schedule(req("short " * 100), FLEET))  # < promptTokens
    assert not PrefixBasedPDDecider("d", Params({}, "p")).disaggregate(req(LONG), d)  # 0: off
    assert AlwaysDisaggPDDecider("a", Params({}, "p")).disaggregate(req("x"), d)
    no_match = Decision(("d1:8000",), "decode", [], (), (), [], [], d.cycle.__class__())
    assert not decider.disaggregate(req(LONG), no_match)


def test_the_references_pd_samples_load() -> None:
    for sample in ("pd-epp-config.yaml", "sim-pd-epp-config.yaml"):
        s, _ = load_config(str(FIXTURES / sample)).build()
        assert s.prefill is not None and s.profile.name == "decode" and s.prefill.profile.name == "prefill"
        d = s.schedule(req(LONG), FLEET)
        assert d.prefill is not None and d.prefill.primary.startswith("p")


@pytest.mark.parametrize(("change", "error"), [
    (lambda t: t.replace("- name: prefill\n", "- name: other\n"),
     r"the prefill profile 'prefill' is not among schedulingProfiles"),
    (lambda t: t.replace("deciders: {prefill: prefix-based-pd-decider}", "deciders: {prefill: nope}"),
     r"deciders\.prefill: no plugin named 'nope'"),
    (lambda t: t.replace("deciders: {prefill: prefix-based-pd-decider}", "deciders: {prefill: queue-scorer}"),
     r"'queue-scorer' is a scorer, not a decider"),
    (lambda t: t.replace("deciders: {prefill: prefix-based-pd-decider}",
                         "deciders: {prefill: prefix-based-pd-decider, encode: x}"), r"encode: not supported by epp"),
    (lambda t: t.replace("- type: disagg-profile-handler\n  parameters:\n    deciders: {prefill: "
                         "prefix-based-pd-decider}\n", ""),
     r"schedulingProfiles\[1\]: several profiles need a disagg-profile-handler"),
])
def test_the_loader_checks_the_handlers_profiles_and_decider(change: object, error: str) -> None:
    text = change(PD)  # type: ignore[operator]
    with pytest.raises(ConfigError, match=error):
        parse_config(text)


def test_the_decode_profile_needs_a_prefix_matcher_for_the_prefix_decider() -> None:
    text = PD.replace("""- name: decode
  plugins:
  - pluginRef: decode-filter
  - pluginRef: max-score-picker
  - {pluginRef: prefix-cache-scorer, weight: 2}""", """- name: decode
  plugins:
  - pluginRef: decode-filter
  - pluginRef: max-score-picker""")
    with pytest.raises(ConfigError, match=r"schedulingProfiles\[1\]: prefix-based-pd-decider reads the decode pod"):
        parse_config(text)


def test_a_handler_without_a_decider_runs_the_decode_profile_only() -> None:
    h = DisaggProfileHandler("h", Params({"profiles": {"decode": "d"}}, "p"))
    assert h.profile_names() == ("d",)
    text = PD.replace("  parameters:\n    deciders: {prefill: prefix-based-pd-decider}\n", "")
    with pytest.raises(ConfigError, match=r"profile 'prefill' is not run by disagg-profile-handler"):
        parse_config(text)
