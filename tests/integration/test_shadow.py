"""Shadow evaluation through a real Envoy: a candidate config schedules every live request too,
its decisions are tallied (agreement, predicted and estimated cache hits) on /metrics and the
dashboard, and the live routing is what it is without it."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import aiohttp
import orjson
import pytest

from epp.config import load_shadow_config
from epp.requestcontrol.shadow import ShadowEvaluation
from epp.scheduling.types import ConfigError
from epp.stack.local import in_process_stack

from .conftest import chat_body, post

QUEUE_ONLY = """\
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: queue-scorer
- type: random-picker
schedulingProfiles:
- name: default
  plugins:
  - {pluginRef: queue-scorer, weight: 1}
  - {pluginRef: random-picker}
"""
SYSTEM = "You are the billing team's assistant; answer from the ledger only. " * 30


async def test_a_candidate_is_tallied_and_the_live_routing_is_untouched(tmp_path: Path) -> None:
    shadow = tmp_path / "queue-only.yaml"
    shadow.write_text(QUEUE_ONLY)
    async with in_process_stack(servers=4, serve={"shadow_configs": (str(shadow),)}) as stack, \
            aiohttp.ClientSession() as s:
        served: Counter[str] = Counter()
        for i in range(24):
            status, headers, _ = await post(s, f"{stack.url}/v1/chat/completions",
                                            chat_body(f"{SYSTEM} question {i}", max_tokens=2))
            assert status == 200
            served[headers["x-sim-server"]] += 1
        assert len(served) == 1  # live: the shared prefix keeps every request on one pod, as without a shadow
        assert stack.picker is not None
        m = stack.picker.metrics
        view = next(c for c in stack.picker.director.shadow.view()) if stack.picker.director.shadow else None
        assert view is not None and view["config"] == "queue-only" and view["decisions"] == 24
        assert view["agreement"] is not None and view["agreement"] < 0.75  # it spreads them at random
        assert view["estimated_hit_rate"] < view["live_hit_rate"]  # and would have missed the cache more
        assert m.sample_value("epp_shadow_decisions_total", {"config": "queue-only"}) == 24
        port = stack.picker.bound_ports["metrics"]
        async with s.get(f"http://127.0.0.1:{port}/dashboard/events") as r:
            event = orjson.loads((await r.content.readline())[len(b"data: "):])
        assert event["shadow"][0]["config"] == "queue-only"
        assert event["decisions"][0]["shadow"][0]["config"] == "queue-only"  # where it would have sent each one
        assert event["decisions"][0]["shadow"][0]["endpoint"] in stack.addresses
        assert view["queue"] is not None and view["live_queue"] is not None


def test_a_shadow_config_holds_scheduling_only(tmp_path: Path) -> None:
    bad = tmp_path / "with-flow.yaml"
    bad.write_text(QUEUE_ONLY + "featureGates: [flowControl]\n")
    with pytest.raises(ConfigError, match=r"with-flow\.yaml: featureGates: a shadow config holds scheduling only"):
        load_shadow_config(str(bad))
    with pytest.raises(ConfigError, match="cannot read the shadow config"):
        load_shadow_config(str(tmp_path / "missing.yaml"))


def test_sampling_bounds_the_work(tmp_path: Path) -> None:
    import random

    from epp.config import load_config
    from epp.datastore.endpoint import EngineSignals
    from epp.datastore.store import Datastore
    from epp.request import InferenceRequest

    store = Datastore()
    store.set_endpoints(["10.0.0.1:8000", "10.0.0.2:8000"])
    for a in store.addresses():
        store.record_scrape(a, EngineSignals(), 0)
    live, _ = load_config(None).build()
    candidate, _ = load_config(None).build()
    ev = ShadowEvaluation([("same", candidate)], sample_rate=0.25, rng=random.Random(7))
    for i in range(400):
        req = InferenceRequest(f"r{i}", "/v1/completions", model="m", prompt=f"prompt {i}")
        ev.observe(req, store.snapshot(), live.schedule(req, store.snapshot()))
    assert 70 <= ev.candidates[0].tally.decisions <= 130
    with pytest.raises(ValueError, match="shadow-sample-rate"):
        ShadowEvaluation([("x", candidate)], sample_rate=0)
