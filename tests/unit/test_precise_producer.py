"""precise-prefix-cache-producer: the reference's split pipeline (token-producer -> producer ->
prefix-cache-scorer), its parameters, its KV-event subscription, and epp's closed loop."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from epp.blockhash import block_hashes
from epp.config import parse_config
from epp.datastore.endpoint import EndpointState, EngineSignals
from epp.datastore.store import Snapshot
from epp.request import InferenceRequest
from epp.scheduling.contract import HoldsPrefixIndex, declares
from epp.scheduling.params import Params
from epp.scheduling.precise_producer import PrecisePrefixProducer
from epp.scheduling.types import MATCHED_TOKENS, PROMPT_TOKENS, ConfigError, CycleState

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "reference"
IDS = list(range(1000, 1100))  # 100 tokens: 6 blocks of 16


def pipeline(producer_params: str = "{}", tokens: str = "- {type: token-producer, parameters: {tokenizer: sim}}"
             ) -> str:
    return f"""apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
{tokens}
- type: precise-prefix-cache-producer
  parameters: {producer_params}
- type: prefix-cache-scorer
  parameters: {{prefixMatchInfoProducerName: precise-prefix-cache-producer}}
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: prefix-cache-scorer
    weight: 10
"""


def ep(addr: str) -> EndpointState:
    return EndpointState(addr, EngineSignals(block_size=16), scraped_at=1000.0)


POOL = Snapshot((ep("10.0.0.1:8000"), ep("10.0.0.2:8000")), {}, {}, 1000.0, 2.0)


def req(ids: list[int] | None = IDS, real: bool = True, prompt: str = "p" * 400) -> InferenceRequest:
    r = InferenceRequest("id", "/v1/completions", model="m", prompt=prompt, body={"model": "m", "prompt": prompt})
    r.token_ids, r.real_tokens = ids, real
    return r


def stored(hashes: list[int]) -> list[dict[str, Any]]:
    return [{"type": "BlockStored", "block_hashes": hashes}]


def producer_of(scheduler: Any) -> PrecisePrefixProducer:
    found = [p for p in scheduler.plugins() if isinstance(p, PrecisePrefixProducer)]
    assert len(found) == 1
    return found[0]


def test_the_pods_reported_blocks_are_the_match_the_scorer_reads() -> None:
    s, _ = parse_config(pipeline()).build()
    prod = producer_of(s)
    hashes = block_hashes(IDS, 16)
    prod.events.apply("10.0.0.2:8000", stored(hashes[:4]))
    d = s.schedule(req(), POOL)
    assert d.primary == "10.0.0.2:8000"
    assert d.cycle.get(MATCHED_TOKENS) == {"10.0.0.2:8000": 64}
    assert d.cycle.get(PROMPT_TOKENS) == 100
    assert d.scores()["10.0.0.2:8000"][1]["prefix-cache-scorer"] == pytest.approx(4 / 6)
    assert prod.used == {"precise": 1, "approximate": 0}


def test_without_real_token_ids_the_approximate_index_matches() -> None:
    s, _ = parse_config(pipeline()).build()
    prod = producer_of(s)
    prod.events.apply("10.0.0.2:8000", stored(block_hashes(IDS, 16)))
    first = s.schedule(req(ids=None), POOL)
    s.committed(first)  # the approximate index learns the pick
    for r in (req(ids=None), req(ids=IDS, real=False)):  # no ids; the byte estimate
        d = s.schedule(r, POOL)
        assert d.primary == first.primary  # the approximate index's affinity, not the pods' report
    assert prod.used == {"precise": 0, "approximate": 3}


def test_the_closed_loop_falls_back_and_recovers() -> None:
    s, _ = parse_config(pipeline()).build()
    prod = producer_of(s)
    prod.events.apply("10.0.0.1:8000", stored(block_hashes(IDS, 16)))
    for _ in range(16):  # the pod says it holds 96 tokens; its responses report none cached
        d = s.schedule(req(), POOL)
        s.usage(d, 0)
    assert not prod.tracker.trusted
    d = s.schedule(req(), POOL)
    assert d.cycle.get(MATCHED_TOKENS) != {"10.0.0.1:8000": 96}  # the approximate index's
    for _ in range(200):  # the pod's reports agree again (when it is the one chosen)
        d = s.schedule(req(), POOL)
        s.usage(d, 96 if d.primary == "10.0.0.1:8000" else 0)
    assert prod.tracker.trusted


def test_speculative_indexing_counts_a_pick_until_the_events_come(monkeypatch: pytest.MonkeyPatch) -> None:
    s, _ = parse_config(pipeline("{speculativeIndexing: true, speculativeTTL: 2s}")).build()
    prod = producer_of(s)
    first = s.schedule(req(), POOL)
    s.committed(first)
    d = s.schedule(req(), POOL)
    assert d.cycle.get(MATCHED_TOKENS) == {first.primary: 96} and d.primary == first.primary
    off, _ = parse_config(pipeline()).build()
    s2 = off
    first = s2.schedule(req(), POOL)
    s2.committed(first)
    assert s2.schedule(req(), POOL).cycle.get(MATCHED_TOKENS) == {}
    t = [0.0]
    monkeypatch.setattr("epp.scheduling.precise_producer.time.monotonic", lambda: 5000.0 + t[0])
    s3, _ = parse_config(pipeline("{speculativeIndexing: true, speculativeTTL: 2s}")).build()
    s3.committed(s3.schedule(req(), POOL))
    t[0] = 2.5  # past the TTL: no longer counted
    assert s3.schedule(req(), POOL).cycle.get(MATCHED_TOKENS) == {}
    assert prod.speculative


def test_token_processor_parameters() -> None:
    p = PrecisePrefixProducer("p", Params({"tokenProcessorConfig": {"blockSize": 64, "hashSeed": "42"}}, "p"))
    assert p.block_size == 64
    s, _ = parse_config(pipeline("{tokenProcessorConfig: {blockSizeTokens: 16, hashSeed: '42'}}")).build()
    prod = producer_of(s)
    prod.events.apply("10.0.0.1:8000", stored(block_hashes(IDS, 16, seed="42")))
    assert s.schedule(req(), POOL).cycle.get(MATCHED_TOKENS) == {"10.0.0.1:8000": 96}


def test_the_kv_events_subscription_follows_the_references_fields() -> None:
    def spec(kv: dict[str, Any]) -> Any:
        sub = PrecisePrefixProducer("p", Params({"kvEventsConfig": kv}, "p")).kv_subscription()
        return sub[0] if sub else None

    default = spec({})
    assert (default.endpoint, default.replay_endpoint, default.topic, default.shared) == \
        ("tcp://*:5557", None, "kv@", None)  # each pod's publisher, which binds *:5557
    both = spec({"zmqEndpoint": "tcp://127.0.0.1:6000", "topicFilter": "kv@pod",
                 "podDiscoveryConfig": {"socketPort": 7000, "replaySocketPort": 7001,
                                        "podLabelSelector": "app=vllm"}})
    assert (both.endpoint, both.replay_endpoint, both.topic, both.shared) == \
        ("tcp://*:7000", "tcp://*:7001", "kv@pod", "tcp://127.0.0.1:6000")
    assert spec({"discoverPods": False, "zmqEndpoint": "tcp://127.0.0.1:6000"}).endpoint == ""
    assert spec({"discoverPods": False}) is None


@pytest.mark.parametrize(("params", "error"), [
    ({"tokenProcessorConfig": {"hashAlgorithm": "xxh64"}}, r"hashAlgorithm: not supported by epp"),
    ({"kvEventsConfig": {"engineType": "sglang"}}, r"engineType: 'sglang' is not supported by epp"),
    ({"kvEventsConfig": {"engineType": "trt"}}, r"engineType: must be vllm or sglang"),
    ({"kvEventsConfig": {"zmqEndpoint": "ipc:///tmp/x"}}, r"zmqEndpoint: expected tcp://host:port"),
    ({"indexerConfig": {"kvBlockIndexConfig": {"redisConfig": {"address": "r:6379"}}}},
     r"redisConfig: not supported by epp"),
    ({"indexerConfig": {"tokenizersPoolConfig": {"modelName": "m"}}},
     r"tokenizersPoolConfig: not supported by epp \(configure a token-producer"),
    ({"indexerConfig": {"kvCacheBackendConfigs": [{"name": "gpu", "weight": 1}]}},
     r"kvCacheBackendConfigs: not supported by epp"),
    ({"tokenProcessorConfig": {"blockSizeTokens": "16"}}, r"blockSizeTokens: expected an integer"),
    ({"speculativeTTL": "forever"}, r"speculativeTTL"),
    ({"kvEventsConfig": {"zmqEndpoints": "x"}}, r"kvEventsConfig\.zmqEndpoints: unknown parameter"),
])
def test_bad_parameters_name_the_field(params: dict[str, Any], error: str) -> None:
    with pytest.raises(ConfigError, match=error):
        PrecisePrefixProducer("p", Params(params, "plugins[1].parameters"))


def test_the_reference_index_metrics_when_enabled() -> None:
    s, _ = parse_config(pipeline("{indexerConfig: {kvBlockIndexConfig: {enableMetrics: true, "
                                 "metricsLoggingInterval: 60000000000}}}")).build()
    prod = producer_of(s)
    assert prod.log_every == 60.0
    prod.events.apply("10.0.0.1:8000", stored(block_hashes(IDS, 16)))
    prod.events.apply("10.0.0.1:8000", [{"type": "BlockRemoved", "block_hashes": block_hashes(IDS, 16)[5:]}])
    s.schedule(req(), POOL)
    got = {f.name: f for f in prod.metric_families("pool")}
    value = {name: fam.samples[0].value for name, fam in got.items() if fam.samples}
    assert value["llm_d_epp_kv_cache_index_admissions"] == 6
    assert value["llm_d_epp_kv_cache_index_evictions"] == 1
    assert value["llm_d_epp_kv_cache_index_lookup_requests"] == 1
    assert value["llm_d_epp_kv_cache_index_lookup_hits"] == 5
    assert value["kvcache_index_admissions"] == 6  # the deprecated name too
    assert "llm_d_epp_kv_cache_index_lookup_latency_seconds" in got
    quiet, _ = parse_config(pipeline()).build()
    assert not any(f.name.startswith("llm_d_epp_kv") for f in producer_of(quiet).metric_families("pool"))


def test_the_producer_is_a_plugin_of_the_profile_and_counts_its_index_once() -> None:
    s, _ = parse_config(pipeline()).build()
    holders = [p for p in s.plugins() if declares(p, HoldsPrefixIndex)]
    assert [type(p).__name__ for p in holders].count("PrecisePrefixProducer") == 1
    s.committed(s.schedule(req(ids=None), POOL))
    assert sum(p.prefix_index_size() for p in holders) == producer_of(s).approx.index.size() > 0


def test_without_a_token_producer_it_says_so_at_load(caplog: pytest.LogCaptureFixture) -> None:
    parse_config(pipeline(tokens=""))
    assert "no token-producer is listed: matched on the approximate index" in caplog.text
    parse_config(pipeline(tokens="- type: token-producer"))
    assert "estimates tokens from bytes" in caplog.text


@pytest.mark.parametrize("name", ["sim-epp-tokenizer-vllm-http-config.yaml", "epp-precise-prefix-cache-config.yaml",
                                  "sim-epp-kvcache-config.yaml", "sim-epp-no-hit-lru.yaml"])
def test_the_references_precise_samples_load_and_build(name: str) -> None:
    cfg = parse_config((FIXTURES / name).read_text(), name)
    s, _ = cfg.build()
    prod = producer_of(s)
    scorer = next(sc for sc, _ in s.profile.scorers if sc.type_name == "prefix-cache-scorer")
    assert scorer.producer is prod
    cycle = CycleState()
    assert prod.match(req(), list(POOL.endpoints), cycle).block_tokens == prod.block_size
