"""epp tune's parts: the trace reader, prompts made from block hashes, the speed fit, the config
space, the replay (deterministic, routing-sensitive) and a small search end to end."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from epp.bench.workloads import WorkloadParams, build
from epp.config import DEFAULT_CONFIG, precise_config
from epp.requestcontrol.recorder import block_hashes
from epp.sim.profiles import profile
from epp.sim.tokenizer import SimTokenizer
from epp.tuning.replay import ReplayError, ReplayOptions, Workload, run_replay
from epp.tuning.trace import PromptMaker, TracedRequest, TraceError, load_trace, measure_speed
from epp.tuning.tune import ConfigSpace, TuneError, TuneOptions, parse_axis, tune
from tests.integration.test_flow_control import flow_config

SMALL = WorkloadParams(groups=12, prefix_tokens=1200, question_tokens=20, output_tokens=12)


def write_trace(path: Path, n: int = 120, rate: float = 30.0, servers: int = 4, seed: int = 1,
                params: WorkloadParams = SMALL, critical_every: int = 0) -> Path:
    """A trace in epp record's format for a bench workload (hashes of the prompts, no text)."""
    lines = [{"pool": [{"address": f"10.1.0.{i}:8000", "labels": {}, "block_size": 16, "num_gpu_blocks": 400,
                        "models": ["m"]} for i in range(servers)]}]
    for k, s in enumerate(build("zipf", n, rate, seed, params).sessions):
        prompt = s.system + s.questions[0]
        critical = critical_every and k % critical_every == 0
        lines.append({"t": round(s.start_s, 4), "model": "m", "target_model": "m", "api": "completions",
                      "path": "/v1/completions", "stream": True, "max_tokens": s.max_tokens,
                      "prompt_chars": len(prompt), "blocks": block_hashes("m", prompt),
                      "prompt_tokens": len(prompt) // 5, "completion_tokens": s.max_tokens, "cached_tokens": None,
                      "status": 200, "endpoint": "", "ttft_ms": None, "duration_ms": 100.0,
                      "priority": 10 if critical else 0, "flow": "a1b2c3d4e5f6" if critical else None})
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return path


def test_the_trace_reader_names_the_line_it_cannot_use(tmp_path: Path) -> None:
    good = write_trace(tmp_path / "t.jsonl", n=5)
    trace = load_trace(good)
    assert len(trace.pool) == 4 and trace.pool[0].num_gpu_blocks == 400 and len(trace.requests) == 5
    lines = good.read_text().splitlines()
    bad = json.loads(lines[2])
    bad["prompt_tokens"] = "many"
    (tmp_path / "bad.jsonl").write_text("\n".join([lines[0], lines[1], json.dumps(bad)]))
    with pytest.raises(TraceError, match=r"bad.jsonl:3.prompt_tokens: expected int, got 'many'"):
        load_trace(tmp_path / "bad.jsonl")
    (tmp_path / "junk.jsonl").write_text("{not json\n")
    with pytest.raises(TraceError, match=r"junk.jsonl:1: not JSON"):
        load_trace(tmp_path / "junk.jsonl")
    (tmp_path / "empty.jsonl").write_text(lines[0] + "\n")
    with pytest.raises(TraceError, match="holds no request"):
        load_trace(tmp_path / "empty.jsonl")
    with pytest.raises(TraceError, match="cannot read the trace"):
        load_trace(tmp_path / "missing.jsonl")


def _request(blocks: tuple[str, ...], tokens: int) -> TracedRequest:
    return TracedRequest(0.0, "m", blocks, len(blocks) * 64 + 10, tokens, 4, 4, True, None, None, 0.1, 200, "")


def test_made_up_prompts_share_exactly_the_recorded_prefixes() -> None:
    maker, tok = PromptMaker(tokens_per_block=13), SimTokenizer()
    a = tok.encode(maker.prompt(_request(("h1", "h2", "h3"), 45), 0))
    b = tok.encode(maker.prompt(_request(("h1", "h2", "x3"), 45), 1))
    c = tok.encode(maker.prompt(_request(("h1", "h2", "h3"), 45), 2))
    assert len(a) == len(b) == 45  # the recorded token count
    shared = next(i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y)
    assert shared == 26  # two blocks of 13 tokens
    assert a[:39] == c[:39] and a[39:] != c[39:]  # the same three blocks, then each request's own tail


def test_the_speed_fit_recovers_the_engines_prefill_and_decode() -> None:
    rng = random.Random(3)
    reqs = []
    for _ in range(400):
        uncached = rng.randrange(100, 6000)
        wait = rng.expovariate(1 / 0.05) if rng.random() < 0.7 else 0.0  # most waited in a queue
        ttft = 0.012 + 0.00005 * uncached + wait
        out = rng.randrange(16, 128)
        step = 0.008 * (1 + rng.random())
        reqs.append(TracedRequest(0.0, "m", (), uncached * 4, uncached + 200, out, out, True, 200, ttft,
                                  ttft + step * (out - 1), 200, "a"))
    fit = measure_speed(reqs)
    assert fit.prefill_per_token_s == pytest.approx(0.00005, rel=0.15)
    assert fit.first_token_overhead_s == pytest.approx(0.012, abs=0.006)
    assert fit.decode_step_s == pytest.approx(0.0088, rel=0.1)
    params = fit.applied(profile("h100-llama8b"))
    assert params.decode_base_s + params.decode_per_seq_s == pytest.approx(fit.decode_step_s)
    assert measure_speed(reqs[:5]).prefill_per_token_s is None  # too few to say


def test_the_speed_fit_holds_when_few_prompts_are_cold() -> None:
    """A cache-friendly trace: nine in ten requests hit (44 tokens to compute), one in ten is a
    3,000-token cold prefill; the cold ones are their own size bin, not the top of a quantile."""
    rng = random.Random(5)
    reqs = []
    for i in range(600):
        uncached = 3052 if i % 10 == 0 else 44
        ttft = 0.011 + 0.00004 * uncached + (rng.expovariate(1 / 0.02) if rng.random() < 0.5 else 0.0)
        reqs.append(TracedRequest(0.0, "m", (), 15000, 3052, 64, 64, True, 3052 - uncached, ttft, ttft + 0.45,
                                  200, "a"))
    assert measure_speed(reqs).prefill_per_token_s == pytest.approx(0.00004, rel=0.1)


def test_the_config_space_varies_the_scorers_weights_and_refuses_what_it_cannot_set() -> None:
    space = ConfigSpace(DEFAULT_CONFIG, "<default>", [])
    assert [a.label for a in space.axes] == ["queue-scorer.weight", "kv-cache-utilization-scorer.weight",
                                             "prefix-cache-scorer.weight"]
    assert space.current == (("queue-scorer.weight", 2), ("kv-cache-utilization-scorer.weight", 2),
                             ("prefix-cache-scorer.weight", 3))
    text = space.render((("queue-scorer.weight", 1), ("kv-cache-utilization-scorer.weight", 0),
                         ("prefix-cache-scorer.weight", 5)))
    assert "weight: 5" in text and "weight: 0" in text
    with pytest.raises(TuneError, match="not a scorer of the profile"):
        ConfigSpace(DEFAULT_CONFIG, "<default>", [parse_axis("max-score-picker.weight=1,2")])
    with pytest.raises(TuneError, match="no plugin named 'nope'"):
        ConfigSpace(DEFAULT_CONFIG, "<default>", [parse_axis("nope.blockSize=1")])
    with pytest.raises(TuneError, match="blockSizeTokens"):  # a value the plugin refuses fails at once
        ConfigSpace(DEFAULT_CONFIG, "<default>", [parse_axis("prefix-cache-scorer.blockSizeTokens=-4")])
    with pytest.raises(TuneError, match=r"expected PLUGIN\.weight"):
        parse_axis("weight")
    with pytest.raises(ReplayError, match=r"precise-prefix-cache-scorer .* KV events"):
        ConfigSpace(precise_config("sim", "tcp://127.0.0.1:5557"), "<precise>", [])


def _weights(queue: int, kv: int, prefix: int) -> str:
    return (DEFAULT_CONFIG.replace("weight: 2\n  - pluginRef: kv", f"weight: {queue}\n  - pluginRef: kv")
            .replace("weight: 2\n  - pluginRef: prefix", f"weight: {kv}\n  - pluginRef: prefix")
            .replace("weight: 3", f"weight: {prefix}"))


def test_a_replay_is_deterministic_and_sees_what_routing_changes(tmp_path: Path) -> None:
    trace = load_trace(write_trace(tmp_path / "t.jsonl", n=150, rate=40))
    work = Workload.from_trace(trace)
    engines = [profile("h100-llama8b").with_overrides(num_gpu_blocks=400)] * 4
    one = run_replay(DEFAULT_CONFIG, "default", work, engines).summary()
    again = run_replay(DEFAULT_CONFIG, "default", work, engines).summary()
    assert one == {**again, "wall_s": one["wall_s"]}
    assert one["requests"] == 150 and not one["refused"] and not one["failed"]
    assert one["virtual_s"] >= trace.seconds  # the trace's whole span, in virtual time
    blind = run_replay(_weights(1, 1, 0), "no prefix", work, engines).summary()
    assert one["prefix_hit_rate"] > blind["prefix_hit_rate"] + 0.1  # prefix affinity shows in the pods' caches
    other_seed = run_replay(DEFAULT_CONFIG, "default", work, engines, ReplayOptions(seed=9)).summary()
    assert other_seed["requests"] == 150


def test_a_small_search_writes_a_config_at_least_as_good_as_the_current_one(tmp_path: Path) -> None:
    trace = write_trace(tmp_path / "t.jsonl", n=120, rate=40)
    out = tmp_path / "out"
    start = _weights(2, 2, 0)  # a poor start: no prefix affinity
    result = tune(trace, out, start, "start.yaml", [parse_axis("prefix-cache-scorer.weight=0,3")],
                  TuneOptions(seeds=1, workers=1, rounds=1))
    assert result["current"]["config"] == "prefix-cache-scorer.weight=0"
    assert result["best"]["config"] == "prefix-cache-scorer.weight=3"
    assert result["best"]["ttft_p90_s"] < result["current"]["ttft_p90_s"]
    best = (out / "best-config.yaml").read_text()
    assert best.startswith("# epp tune: the best of 2 configs") and "weight: 3" in best
    assert {p.name for p in out.iterdir()} >= {"tune.json", "tune.md", "best-config.yaml", "tune.png"}
    assert "| best | prefix-cache-scorer.weight=3 |" in (out / "tune.md").read_text()


def test_a_whole_candidate_config_is_compared_and_can_win(tmp_path: Path) -> None:
    trace = write_trace(tmp_path / "t.jsonl", n=120, rate=40)
    start = _weights(2, 2, 0)
    result = tune(trace, tmp_path / "out", start, "start.yaml", [parse_axis("queue-scorer.weight=2")],
                  TuneOptions(seeds=1, workers=1, rounds=1), candidates=[("default.yaml", DEFAULT_CONFIG)])
    assert result["best"]["config"] == "default.yaml" and result["best"]["seeds"] == 5  # confirmed on 4 more
    assert (tmp_path / "out" / "best-config.yaml").read_text().endswith(DEFAULT_CONFIG)
    with pytest.raises(ReplayError, match="cannot be replayed"):
        tune(trace, tmp_path / "o2", candidates=[("p.yaml", precise_config("sim", "tcp://127.0.0.1:5557"))])


FLOW = flow_config("  defaultRequestTTL: 30s", max_concurrency=2, fairness="program-aware-fairness")


def test_flow_control_holds_requests_in_virtual_time_and_serves_them_all(tmp_path: Path) -> None:
    trace = load_trace(write_trace(tmp_path / "t.jsonl", n=80, rate=200))  # a burst: 2 per pod at a time
    engines = [profile("h100-llama8b").with_overrides(num_gpu_blocks=400)] * 4
    held = run_replay(FLOW, "flow", Workload.from_trace(trace), engines)
    summary = held.summary()
    assert summary["requests"] == 80 and not summary["refused"] and not summary["failed"]
    assert summary["queued_p90_s"] > 0.05  # held in epp (virtual seconds), then dispatched as pods freed up
    again = run_replay(FLOW, "flow", Workload.from_trace(trace), engines).summary()
    assert again["queued_p90_s"] == summary["queued_p90_s"]  # the waiting room runs on the virtual clock too


def test_a_percentile_at_the_compulsory_misses_is_flagged(tmp_path: Path) -> None:
    from epp.tuning.tune import knee_warnings

    trace = load_trace(write_trace(tmp_path / "t.jsonl", n=120, rate=40))
    share = trace.first_seen_share()
    assert 0.05 < share < 0.2  # 12 system prompts over ~120 requests (+ the first of each group)
    assert knee_warnings("p90", 0.08) and "compulsory misses (8.0%" in knee_warnings("p90", 0.08)[0]
    assert not knee_warnings("p90", 0.03) and not knee_warnings("p99", 0.08) and not knee_warnings("mean", 0.1)


def test_recorded_priorities_keep_their_order_in_a_flow_controlled_replay(tmp_path: Path) -> None:
    trace = load_trace(write_trace(tmp_path / "t.jsonl", n=120, rate=300, critical_every=4))
    assert {r.priority for r in trace.requests} == {0, 10} and trace.requests[0].flow == "a1b2c3d4e5f6"
    engines = [profile("h100-llama8b").with_overrides(num_gpu_blocks=400)] * 4
    summary = run_replay(FLOW, "flow", Workload.from_trace(trace), engines).summary()
    by = summary["ttft_p90_by_priority_s"]
    assert set(by) == {0, 10} and by[10] < by[0] / 2  # the critical band dispatches first while pods are full


def test_a_replay_that_fails_is_a_clear_error_naming_the_config() -> None:
    from concurrent.futures import Future

    from epp.tuning.tune import _result

    job: Future[dict[str, object]] = Future()
    job.set_exception(RuntimeError("a plugin broke"))
    with pytest.raises(TuneError, match=r"the replay of prefix-cache-scorer\.weight=3 failed: RuntimeError: a plugin"):
        _result(job, "prefix-cache-scorer.weight=3")
