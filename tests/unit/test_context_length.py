"""context-length-aware: the reference's range scores and optional filter, from pod labels."""

from __future__ import annotations

import pytest

from epp.config import parse_config
from epp.datastore.endpoint import EndpointState, EngineSignals
from epp.datastore.store import Snapshot
from epp.request import InferenceRequest
from epp.scheduling.context_length import parse_range, range_score
from epp.scheduling.types import ConfigError, SchedulingError

LABEL = "llm-d.ai/context-length-range"


def doc(params: str = "{}") -> str:
    return f"""apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- {{name: context-router, type: context-length-aware, parameters: {params}}}
schedulingProfiles:
- name: default
  plugins:
  - {{pluginRef: context-router, weight: 8}}
"""


def pod(addr: str, rng: str | None) -> EndpointState:
    return EndpointState(addr, EngineSignals(), scraped_at=1000.0, labels={LABEL: rng} if rng is not None else {})


POOL = Snapshot((pod("short", "0-2048"), pod("long", "2048-32768"), pod("plain", None), pod("broken", "8k-16k")),
                {}, {}, 1000.0, 2.0)


def req(tokens: int) -> InferenceRequest:
    return InferenceRequest("id", "/v1/completions", model="m", prompt="abcd" * tokens)


def test_the_references_range_scores() -> None:
    assert range_score(1000, 0, 2048) == pytest.approx(0.3 + 0.7 * (0.7 / 1.2048 + 0.3 * 1048 / 2048))
    assert range_score(512, 512, 512) == 1.0
    assert range_score(9000, 0, 8192) == pytest.approx(0.3 / 1.808)  # out of range: by distance
    assert range_score(9000, 0, 8192) > range_score(9000, 0, 2048)
    assert [parse_range(t) for t in ("0-2048", " 1 - 5 ", "5-1", "a-b", "1-2-3", "12")] == [
        (0, 2048), (1, 5), None, None, None, None]


def test_short_prompts_go_to_short_pods_and_long_ones_to_long_pods() -> None:
    s, _ = parse_config(doc()).build()
    assert s.schedule(req(1000), POOL).primary == "short"
    d = s.schedule(req(10000), POOL)
    assert d.primary == "long"
    scores = {a: v[1]["context-router"] for a, v in d.scores().items()}
    assert scores["plain"] == 0.5 and scores["broken"] == 0.0 and scores["short"] < 0.3


def test_with_filtering_out_of_range_and_unparsable_pods_are_dropped() -> None:
    s, _ = parse_config(doc("{enableFiltering: true}")).build()
    d = s.schedule(req(10000), POOL)
    assert sorted(c.address for c in d.candidates) == ["long", "plain"]
    only_short = Snapshot((pod("short", "0-2048"),), {}, {}, 1000.0, 2.0)
    with pytest.raises(SchedulingError, match="context-router"):
        s.schedule(req(10000), only_short)
    with pytest.raises(ConfigError, match=r"plugins\[0\]\.parameters\.label: must be specified"):
        parse_config(doc("{label: ''}"))
