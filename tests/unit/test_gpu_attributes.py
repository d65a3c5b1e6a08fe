"""dcgm-data-source + dcgm-extractor + endpoint-attribute-filter / -scorer: the reference's GPU
utilization routing (deploy/config/sim-epp-gpu-config.yaml)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from epp.config import build, parse_config
from epp.datastore.endpoint import EndpointState, EngineSignals
from epp.datastore.store import Datastore, Snapshot
from epp.request import InferenceRequest
from epp.scheduling.attributes import EndpointAttributeFilter, EndpointAttributeScorer
from epp.scheduling.params import Params
from epp.scheduling.types import ConfigError, CycleState
from epp.signals.attributes import AttributePoller
from epp.signals.dcgm import gpu_utilization
from epp.signals.promtext import ParseError
from tests.exposition_server import exposition_server

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "reference"
KEY = "GPUUtilization/dcgm-extractor"
# As the DCGM exporter writes it (a DaemonSet's: one sample per GPU, labelled with the pod using it).
EXPOSITION = """# HELP DCGM_FI_DEV_GPU_UTIL GPU utilization (in %).
# TYPE DCGM_FI_DEV_GPU_UTIL gauge
DCGM_FI_DEV_GPU_UTIL{gpu="0",UUID="GPU-a",device="nvidia0",pod="vllm-a",namespace="ns",container="vllm"} 35
DCGM_FI_DEV_GPU_UTIL{gpu="1",UUID="GPU-b",device="nvidia1",pod="vllm-a",namespace="ns",container="vllm"} 81
DCGM_FI_DEV_GPU_UTIL{gpu="2",UUID="GPU-c",device="nvidia2",pod="vllm-b",namespace="ns",container="vllm"} 12
# HELP DCGM_FI_DEV_FB_USED Framebuffer memory used (in MiB).
# TYPE DCGM_FI_DEV_FB_USED gauge
DCGM_FI_DEV_FB_USED{gpu="0",UUID="GPU-a",pod="vllm-a"} 60000
"""


def test_the_extractor_takes_the_pods_busiest_gpu() -> None:
    assert gpu_utilization(EXPOSITION, "vllm-a") == pytest.approx(0.81)
    assert gpu_utilization(EXPOSITION, "vllm-b") == pytest.approx(0.12)
    assert gpu_utilization(EXPOSITION, "") == pytest.approx(0.81)  # no pod name: every sample (a sidecar)
    with pytest.raises(ParseError, match="no sample for pod 'vllm-c'"):
        gpu_utilization(EXPOSITION, "vllm-c")
    with pytest.raises(ParseError, match="no DCGM_FI_DEV_GPU_UTIL"):
        gpu_utilization("up 1\n", "")


def ep(addr: str, util: float | None) -> EndpointState:
    return EndpointState(addr, EngineSignals(), scraped_at=1000.0, attributes={} if util is None else {KEY: util})


def filt(**p: Any) -> EndpointAttributeFilter:
    base = {"attribute": "GPUUtilization", "producer": "dcgm-extractor",
            "algorithm": {"type": "threshold", "threshold": {"operator": "LessThanOrEqual", "value": 0.9}}}
    return EndpointAttributeFilter("f", Params({**base, **p}, "f"))


def run_filter(f: EndpointAttributeFilter, eps: list[EndpointState]) -> list[str]:
    snap = Snapshot(tuple(eps), {}, {}, 1000.0, 2.0)
    return [e.address for e in f.filter(InferenceRequest("r", "/v1/completions"), snap, eps, CycleState())]


def test_the_filter_keeps_the_gpus_under_the_threshold_and_follows_on_missing() -> None:
    eps = [ep("a", 0.95), ep("b", 0.5), ep("c", None)]
    assert run_filter(filt(), eps) == ["b", "c"]  # onMissing Pass (default)
    assert run_filter(filt(onMissing="Fail"), eps) == ["b"]
    assert run_filter(filt(onMissing="Fail"), [ep("a", 0.95)]) == []
    assert run_filter(filt(onMissing="Fail", fallbackOnEmpty=True), [ep("a", 0.95)]) == ["a"]


def test_the_scorer_normalises_fixed_or_adaptive() -> None:
    eps = [ep("a", 0.8), ep("b", 0.2), ep("c", None)]
    snap = Snapshot(tuple(eps), {}, {}, 1000.0, 2.0)
    req = InferenceRequest("r", "/v1/completions")
    fixed = EndpointAttributeScorer("s", Params({"attributeKey": "GPUUtilization", "producer": "dcgm-extractor",
                                                 "algorithm": {"type": "linear_lower_is_better",
                                                               "normalization": {"fixedRange": {"min": 0, "max": 1}}}},
                                                "s"))
    assert fixed.score(req, snap, eps, CycleState()) == pytest.approx([0.2, 0.8, 0.0])
    adaptive = EndpointAttributeScorer("s", Params({"attributeKey": "GPUUtilization", "producer": "dcgm-extractor",
                                                    "algorithm": {"type": "linear_higher_is_better"}}, "s"))
    assert adaptive.score(req, snap, eps, CycleState()) == pytest.approx([1.0, 0.0, 0.0])


@pytest.mark.parametrize(("cls", "p", "error"), [
    (EndpointAttributeFilter, {"attribute": "GPUUtilization"}, r"producer: required in epp"),
    (EndpointAttributeFilter, {"attribute": "Power", "producer": "dcgm-extractor"},
     r"attribute: dcgm-extractor publishes GPUUtilization, not 'Power'"),
    (EndpointAttributeFilter, {"attribute": "GPUUtilization", "producer": "core-metrics-extractor"},
     r"producer: not supported by epp"),
    (EndpointAttributeFilter, {"attribute": "GPUUtilization", "producer": "dcgm-extractor",
                               "algorithm": {"type": "percentile"}}, r"algorithm\.type: must be one of threshold"),
    (EndpointAttributeFilter, {"attribute": "GPUUtilization", "producer": "dcgm-extractor",
                               "algorithm": {"type": "threshold", "threshold": {"operator": "Near", "value": 1}}},
     r"threshold\.operator: must be one of"),
    (EndpointAttributeScorer, {"attributeKey": "GPUUtilization", "producer": "dcgm-extractor",
                               "algorithm": {"type": "linear_lower_is_better",
                                             "normalization": {"fixedRange": {"min": 1, "max": 1}}}},
     r"fixedRange: needs min < max"),
    (EndpointAttributeScorer, {"attributeKey": "GPUUtilization", "producer": "dcgm-extractor"},
     r"algorithm\.type: required"),
])
def test_bad_parameters_name_the_field(cls: type[Any], p: dict[str, Any], error: str) -> None:
    with pytest.raises(ConfigError, match=error):
        cls("x", Params(p, "plugins[2].parameters"))


@pytest.fixture
async def exporter() -> AsyncIterator[tuple[int, list[str]]]:
    """A server speaking the DCGM exporter's exposition (what the data source scrapes)."""
    body = [EXPOSITION]
    async with exposition_server(lambda: (200, body[0])) as port:
        yield port, body


async def test_the_references_gpu_sample_polls_each_pods_utilization(exporter: tuple[int, list[str]]) -> None:
    port, body = exporter
    text = (FIXTURES / "sim-epp-gpu-config.yaml").read_text().replace("port: 9400", f"port: {port}")
    built = build(parse_config(text, "gpu"))
    layer = built.attribute_layer()
    assert layer is not None
    source, extractor = layer
    assert source.attribute_interval() == 1.0
    store = Datastore()
    store.set_endpoints(["127.0.0.1:8001", "127.0.0.1:8002"],
                        names={"127.0.0.1:8001": "ns/vllm-a-rank-0", "127.0.0.1:8002": "ns/vllm-b-rank-0"})
    errors: list[tuple[str, bool]] = []
    poller = AttributePoller(store, source.attribute_target(), 0.05, extractor.attributes,
                             on_error=lambda a, x: errors.append((a, x)))
    poller.start()
    try:
        for _ in range(100):
            if all(e.attributes for e in store.snapshot().endpoints):
                break
            await asyncio.sleep(0.02)
        got = {e.address: e.attributes.get(KEY) for e in store.snapshot().endpoints}
        assert got == {"127.0.0.1:8001": pytest.approx(0.81), "127.0.0.1:8002": pytest.approx(0.12)}
        d = built.scheduler.schedule(InferenceRequest("r", "/v1/completions", model="m"),
                                     _fresh(store.snapshot()))
        assert d.primary == "127.0.0.1:8002"  # the idle GPU (the busy one passes the 0.9 filter, scores lower)
        body[0] = "garbage{\n"
        for _ in range(100):
            if not any(e.attributes for e in store.snapshot().endpoints):
                break
            await asyncio.sleep(0.02)
        assert not any(e.attributes for e in store.snapshot().endpoints) and errors and errors[-1][1]
    finally:
        await poller.stop()


def _fresh(snap: Snapshot) -> Snapshot:
    eps = tuple(replace(e, signals=EngineSignals(), scraped_at=snap.now) for e in snap.endpoints)
    return replace(snap, endpoints=eps)
