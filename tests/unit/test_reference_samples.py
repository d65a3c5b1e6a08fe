"""Every vendored sample of the reference (tests/fixtures/reference, from deploy/config and the
chart) is accepted and builds, or is refused with the one-line "not supported by epp" for the
features epp does not implement (multimodal, topology)."""

from __future__ import annotations

from pathlib import Path

import pytest

from epp.config import parse_config
from epp.scheduling.types import ConfigError

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "reference"

REFUSED = {
    "epp-mm-embeddings-cache-config.yaml": r"'mm-embeddings-cache-producer' is not supported by epp \(multimodal",
    "pd-topology-epp-config.yaml": r"'topology-extractor' is not supported by epp \(topology-aware routing",
    "sim-e-p-d-epp-config.yaml": r"deciders\.encode: not supported by epp \(multimodal encode",
    "sim-e-pd-epp-config.yaml": r"'always-disagg-multimodal-decider' is not supported by epp \(multimodal",
}


@pytest.mark.parametrize("name", sorted(p.name for p in FIXTURES.glob("*.yaml")))
def test_each_sample_loads_or_is_refused_by_name(name: str) -> None:
    text = (FIXTURES / name).read_text()
    refusal = REFUSED.get(name)
    if refusal is not None:
        with pytest.raises(ConfigError, match=refusal) as e:
            parse_config(text, name)
        assert "\n" not in str(e.value)
        return
    scheduler, _ = parse_config(text, name).build()
    assert scheduler.profile.picker is not None
