"""The approx-prefix-cache-producer and the prefix-cache-scorer that reads it (the reference's
current form), next to the early-2026 form with the index parameters on the scorer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from epp.config import build, load_config, parse_config
from epp.datastore.endpoint import EndpointState, EngineSignals
from epp.datastore.store import Snapshot
from epp.request import InferenceRequest
from epp.scheduling.params import Params
from epp.scheduling.prefix_producer import ApproxPrefixProducer
from epp.scheduling.types import MATCHED_TOKENS, ConfigError, CycleState

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "reference"
NEW = "llm-d.ai/v1alpha1"
OLD = "inference.networking.x-k8s.io/v1alpha1"


def doc(plugins: str, refs: str = "  - {pluginRef: prefix-cache-scorer, weight: 1}", api: str = NEW) -> str:
    return f"""apiVersion: {api}
kind: EndpointPickerConfig
plugins:
{plugins}
schedulingProfiles:
- name: default
  plugins:
{refs}
"""


def ep(addr: str, block_size: int | None = None, blocks: int | None = None) -> EndpointState:
    return EndpointState(addr, EngineSignals(block_size=block_size, num_gpu_blocks=blocks), scraped_at=1000.0)


def snap(*eps: EndpointState) -> Snapshot:
    return Snapshot(tuple(eps), {}, {}, 1000.0, 2.0)


def req(prompt: str) -> InferenceRequest:
    return InferenceRequest("id", "/v1/completions", model="m", prompt=prompt)


def scorer_of(text: str, i: int = 0) -> Any:
    s, _ = parse_config(text).build()
    return s.profile.scorers[i][0]


LONG = "a shared system prompt, long enough for several blocks. " * 60  # 3,360 chars: 840 tokens


def test_the_references_sample_loads_with_its_producer_and_the_64_token_floor() -> None:
    s, _ = load_config(str(FIXTURES / "sim-epp-config.yaml")).build()
    producer = s.profile.scorers[0][0].producer
    assert isinstance(producer, ApproxPrefixProducer)
    assert producer.index.block_chars == 64 * 4  # blockSizeTokens 16 is raised to the floor
    assert producer.index.max_blocks == 16384 // 64  # maxPrefixTokensToMatch wins over the block cap
    assert producer.index.lru_capacity == 31250


def test_a_bare_scorer_gets_the_references_defaults_or_the_early_2026_ones_by_apiVersion() -> None:
    new = scorer_of(doc("- type: prefix-cache-scorer")).producer
    assert (new.index.block_chars, new.index.max_blocks) == (256, 131072 // 64)
    old = scorer_of(doc("- type: prefix-cache-scorer", api=OLD)).producer
    assert (old.index.block_chars, old.index.max_blocks) == (64, 256)  # 16-token blocks, as before
    legacy = scorer_of(doc("- type: prefix-cache-scorer\n  parameters: {blockSizeTokens: 8}")).producer
    assert legacy.index.block_chars == 32  # the early-2026 form keeps its own index, as given


def test_scorers_name_their_producer_and_bad_references_name_the_field() -> None:
    two = """- {name: gpu, type: approx-prefix-cache-producer, parameters: {blockSizeTokens: 64}}
- {name: cpu, type: approx-prefix-cache-producer, parameters: {blockSizeTokens: 256}}
- {name: on-gpu, type: prefix-cache-scorer, parameters: {prefixMatchInfoProducerName: gpu}}
- {name: on-cpu, type: prefix-cache-scorer, parameters: {prefixMatchInfoProducerName: cpu}}"""
    refs = "  - {pluginRef: on-gpu, weight: 2}\n  - {pluginRef: on-cpu, weight: 1}"
    assert scorer_of(doc(two, refs), 0).producer.index.block_chars == 256
    assert scorer_of(doc(two, refs), 1).producer.index.block_chars == 1024
    for plugins, error in {
        two.replace("prefixMatchInfoProducerName: cpu", "prefixMatchInfoProducerName: gpu2"):
            r"plugins\[3\]\.parameters\.prefixMatchInfoProducerName: no plugin named 'gpu2'",
        two.replace("{prefixMatchInfoProducerName: cpu}", "{}"):
            r"plugins\[3\]\.parameters\.prefixMatchInfoProducerName: required: the config has 2 prefix producers",
    }.items():
        with pytest.raises(ConfigError, match=error):
            parse_config(doc(plugins, refs))
    cases = {
        "- type: queue-scorer\n- {type: prefix-cache-scorer, parameters: {prefixMatchInfoProducerName: queue-scorer}}":
            r"'queue-scorer' is a scorer, not a prefix producer",
        "- {type: prefix-cache-scorer, parameters: {prefixMatchInfoProducerName: p, blockSizeTokens: 16}}\n"
        "- {name: p, type: approx-prefix-cache-producer}":
            r"plugins\[0\]\.parameters\.blockSizeTokens: an index parameter of the early-2026 form",
        "- {type: prefix-cache-scorer, parameters: {matchLengthWeight: 1.5}}": r"matchLengthWeight: must be <= 1",
        "- {type: prefix-cache-scorer, parameters: {matchLengthWeight: 0.5, matchLengthScaleTokens: 0}}":
            r"matchLengthScaleTokens: must be > 0",
        "- {type: approx-prefix-cache-producer, parameters: {blockSizeToken: 64}}\n- type: prefix-cache-scorer":
            r"plugins\[0\]\.parameters\.blockSizeToken",
    }
    for plugins, error in cases.items():
        with pytest.raises(ConfigError, match=error):
            parse_config(doc(plugins))
    with pytest.raises(ConfigError, match=r"is a prefix producer: list it under plugins only"):
        parse_config(doc("- type: approx-prefix-cache-producer\n- type: prefix-cache-scorer",
                         "  - {pluginRef: approx-prefix-cache-producer}"))


def test_one_producer_read_by_two_scorers_matches_and_records_once() -> None:
    text = doc("- type: approx-prefix-cache-producer\n- {name: ratio, type: prefix-cache-scorer}\n"
               "- {name: length, type: prefix-cache-scorer, parameters: {matchLengthWeight: 1.0, "
               "matchLengthScaleTokens: 512}}",
               "  - {pluginRef: ratio, weight: 1}\n  - {pluginRef: length, weight: 1}")
    s, _ = parse_config(text).build()
    ratio, length = (sc for sc, _ in s.profile.scorers)
    assert ratio.producer is length.producer
    pool = snap(ep("a"), ep("b"))
    first = s.schedule(req(LONG + "question 1"), pool)
    s.committed(first)
    assert ratio.producer.index.size() == len(LONG + "question 1") // 256  # recorded once
    assert ratio.prefix_index_size() + length.prefix_index_size() == 0  # the producer counts its own, once
    assert sum(p.prefix_index_size() for p in s.plugins() if p is ratio.producer) == ratio.producer.index.size()
    d = s.schedule(req(LONG + "question 2"), pool)
    scores = d.scores()[first.primary][1]
    blocks = len(LONG) // 256
    assert scores["ratio"] == pytest.approx(blocks / (len(LONG + "question 2") // 256))
    assert scores["length"] == 1.0  # 13 blocks of 64 tokens: over the 512-token scale
    assert d.cycle.get(MATCHED_TOKENS) == {first.primary: blocks * 64}


def test_auto_tune_takes_the_pods_block_size_and_gpu_blocks() -> None:
    p = ApproxPrefixProducer("p", Params({}, "p"))
    cycle = CycleState()
    m = p.match(req(LONG), [ep("a", block_size=128, blocks=50)], cycle)
    assert m.block_tokens == 128 and p.index.block_chars == 512  # the index started over at 128
    p.record("a", cycle)
    assert p.index.capacities == {"a": 50}
    assert p.index.size() == 6  # 3,360 chars / 512
    assert ApproxPrefixProducer("q", Params(
        {"autoTune": False}, "q")).match(req(LONG), [ep("a", block_size=128)], CycleState()).block_tokens == 64


def test_auto_tune_sizes_each_pods_index_in_its_own_tokens() -> None:
    # A 16-token-block pod with 2,800 GPU blocks holds 44,800 tokens: 700 of the index's 64-token
    # blocks, not 2,800 (the reference's count, 4x what the pod holds).
    p = ApproxPrefixProducer("p", Params({}, "p"))
    p.match(req(LONG), [ep("a", block_size=16, blocks=2800), ep("b", block_size=16, blocks=1120)], CycleState())
    assert p.limits.min_block_tokens == 64 and p.index.capacities == {"a": 700, "b": 280}


def test_auto_tune_sizes_a_large_pool_a_slice_per_pick() -> None:
    from epp.scheduling.prefix_producer import SIZED_PER_PICK

    p = ApproxPrefixProducer("p", Params({}, "p"))
    pool = [ep(f"p{i}", block_size=16, blocks=400 + i) for i in range(3 * SIZED_PER_PICK + 5)]
    p.match(req(LONG), pool, CycleState())
    assert len(p.index.capacities) == SIZED_PER_PICK  # not a pass over the whole pool per pick
    for _ in range(3):
        p.match(req(LONG), pool, CycleState())
    assert p.index.capacities == {f"p{i}": (400 + i) // 4 for i in range(len(pool))}  # all, within 4 picks


def test_the_deprecated_block_size_maps_into_block_size_tokens() -> None:
    text = doc("- {type: approx-prefix-cache-producer, parameters: {blockSize: 128, autoTune: false}}\n"
               "- type: prefix-cache-scorer")
    assert scorer_of(text).producer.index.block_chars == 512


def test_a_reload_keeps_the_producers_index() -> None:
    text = doc("- type: approx-prefix-cache-producer\n- type: prefix-cache-scorer")
    first = build(parse_config(text))
    pool = snap(ep("a"))
    first.scheduler.committed(first.scheduler.schedule(req(LONG), pool))
    again = build(parse_config(text.replace("weight: 1", "weight: 2")), first)
    assert again.scheduler.profile.scorers[0][0].producer.index.size() > 0


NO_HIT = doc("- type: prefix-cache-scorer\n- {type: no-hit-lru-scorer, parameters: {lruSize: 2}}",
             "  - {pluginRef: prefix-cache-scorer, weight: 10}\n  - {pluginRef: no-hit-lru-scorer, weight: 5}")


def test_no_hit_lru_spreads_cold_prompts_and_stays_neutral_on_warm_ones() -> None:
    s, _ = parse_config(NO_HIT).build()
    pool = snap(ep("a"), ep("b"), ep("c"))
    lru = s.profile.scorers[1][0]
    firsts = []
    for i in range(3):  # three cold prompts: each goes to a pod no cold prompt went to yet
        d = s.schedule(req(f"cold prompt number {i} " * 40), pool)
        s.committed(d)
        firsts.append(d.primary)
    assert sorted(firsts) == ["a", "b", "c"]
    assert list(lru.lru) == firsts[1:]  # lruSize 2: the oldest fell out
    d = s.schedule(req("cold prompt number 0 " * 40 + "again"), pool)  # warm on firsts[0]
    assert d.scores()[firsts[0]][1]["no-hit-lru-scorer"] == 0.5 and d.primary == firsts[0]
    s.committed(d)
    assert list(lru.lru) == firsts[1:]  # a warm pick does not move the LRU
    cold = s.schedule(req("yet another cold prompt " * 40), pool).scores()
    # never used (fell out of the LRU) 1.0, then least recently used 0.5, most recent 0.0
    assert [cold[a][1]["no-hit-lru-scorer"] for a in firsts] == [1.0, 0.5, 0.0]


def test_no_hit_lru_parameters_are_the_references() -> None:
    with pytest.raises(ConfigError, match=r"plugins\[1\]\.parameters\.lruSize: must be >= 1"):
        parse_config(NO_HIT.replace("lruSize: 2", "lruSize: 0"))
    with pytest.raises(ConfigError, match=r"prefixMatchInfoProducerName: no plugin named 'x'"):
        parse_config(NO_HIT.replace("lruSize: 2", "prefixMatchInfoProducerName: x"))
    s, _ = parse_config(NO_HIT.replace("lruSize: 2", "prefixPluginName: prefix-cache-scorer")).build()
    assert s.profile.scorers[1][0].size == 1024  # the deprecated name is accepted, with a warning


def test_block_hashes_name_the_whole_prefix() -> None:
    from epp.scheduling.prefix_index import PrefixIndex

    index = PrefixIndex(block_size_tokens=4, max_blocks=8)  # 16 characters per block
    a = index.hashes("m", "x" * 16 + "y" * 16 + "z" * 16 + "tail")
    b = index.hashes("m", "x" * 16 + "y" * 16 + "w" * 16)
    assert len(a) == 3 and a[:2] == b[:2] and a[2] != b[2]  # shared blocks, then apart
    c = index.hashes("m", "q" * 16 + "y" * 16 + "z" * 16)
    assert not set(a) & set(c)  # a block's hash depends on every block before it
    assert not set(a) & set(index.hashes("other-model", "x" * 16 + "y" * 16 + "z" * 16))
    assert len(index.hashes("m", "x" * 16 * 20)) == 8 and index.hashes("m", "short") == []


def test_eviction_takes_a_prefix_deepest_blocks_first() -> None:
    from epp.scheduling.prefix_index import PrefixIndex

    index = PrefixIndex(block_size_tokens=4, max_blocks=8, lru_capacity=5)
    old = index.hashes("m", "a" * 16 * 4)
    index.record("p", old)
    index.record("p", index.hashes("m", "b" * 16 * 3))  # 7 blocks for 5 places: two go
    assert index.size() == 5
    # the old prompt's last two blocks went, so its first two still match (its first block
    # evicted would have made it match nothing)
    assert index.match_lengths(old) == {"p": 2}


def test_the_bisected_match_agrees_with_a_block_by_block_scan() -> None:
    import random

    from epp.scheduling.prefix_index import PrefixIndex, leading_matches

    rng = random.Random(7)
    index = PrefixIndex(block_size_tokens=1, max_blocks=12, lru_capacity=40)  # 4 characters per block
    # prompts that share prefixes of every length, over pods with small LRUs
    prompts = ["".join(rng.choice("ab") for _ in range(4 * rng.randint(1, 12))) for _ in range(60)]
    for _ in range(600):
        pod = rng.choice("pqrs")
        if rng.random() < 0.02:
            index.forget(pod)
        index.capacities[pod] = rng.choice((40, 40, 25))  # a pod's KV cache can shrink (autoTune)
        hashes = index.hashes("m", rng.choice(prompts))
        assert index.match_lengths(hashes) == leading_matches(hashes, index.holders_of)
        index.record(pod, hashes)


def test_a_block_with_one_holder_is_no_container_for_the_garbage_collector() -> None:
    import gc

    from epp.scheduling.prefix_index import PrefixIndex

    index = PrefixIndex(block_size_tokens=1, max_blocks=8, lru_capacity=100)
    a = index.hashes("m", "x" * 32)  # 8 blocks of 4 characters
    index.record("p", a)
    index.record("q", a[:2])
    assert not gc.is_tracked(index._holders[a[5]])  # one holder: its name, not a set
    assert index.holders_of(a[0]) == {"p", "q"}
    index.forget("q")
    assert not gc.is_tracked(index._holders[a[0]]) and index.match_lengths(a) == {"p": 8}
