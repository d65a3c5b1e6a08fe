"""The overload benchmark's bookkeeping: goodput, refusals by reason, tagged sessions."""

from __future__ import annotations

from epp.bench.overload import flow_config, labelled, markdown, slo_stats, tag
from epp.bench.routing import RequestResult
from epp.bench.workloads import build
from epp.config import parse_config


def test_goodput_counts_requests_within_both_slos_and_refusals_by_reason() -> None:
    ok = RequestResult("zipf", 0.0, 200, ttft_s=0.5, e2e_s=0.5 + 15 * 0.04, output_tokens=16)
    slow_first = RequestResult("zipf", 0.0, 200, ttft_s=1.5, e2e_s=2.0, output_tokens=16)
    slow_tokens = RequestResult("zipf", 0.0, 200, ttft_s=0.2, e2e_s=0.2 + 15 * 0.08, output_tokens=16)
    shed = RequestResult("zipf", 0.0, 429, dropped="rejected-ttl-expired")
    lost = RequestResult("zipf", 0.0, 599)
    stats = slo_stats([ok, slow_first, slow_tokens, shed, lost], elapsed=2.0, slo_ttft=1.0, slo_tpot=0.05)
    assert stats["slo_met"] == 1 and stats["goodput_rps"] == 0.5
    assert stats["refused"] == {"429 rejected-ttl-expired": 1} and stats["timed_out"] == 1
    text = markdown({"meta": {"date": "d", "preset": "p", "servers": 1, "capacity_rps": 1, "ttl": "1s",
                              "slo_ttft_s": 1.0, "slo_tpot_s": 0.05},
                     "rows": [{"scenario": "overload", "contender": "epp", "load": 1.6, "requests": 5,
                               "ttft_p50_s": 0.5, "ttft_p90_s": 1.5, "ttft_p99_s": 1.5, "output_tok_per_s": 1,
                               "router_cpu_us_per_req": 1, **stats}]})
    assert "429 rejected-ttl-expired: 1" in text


def test_tagged_sessions_carry_their_headers_and_label() -> None:
    trace = build("zipf", 200, 10.0, seed=3)
    picked = tag(trace, {"x-llm-d-inference-objective": "critical"}, 0.25, seed=1, label="critical")
    tagged = [s for s, p in zip(trace.sessions, picked, strict=True) if p]
    assert 30 < len(tagged) < 70
    assert all(s.headers == {"x-llm-d-inference-objective": "critical"} for s in tagged)
    assert labelled("critical")(RequestResult(tagged[0].kind, 0.0, 200))


def test_the_benchmarks_flow_configs_are_valid() -> None:
    for detector in ("concurrency", "utilization", "concurrency:{maxConcurrency: 8}"):
        cfg = parse_config(flow_config("400ms", detector=detector, holdback=0.6))
        assert cfg.flow is not None and cfg.filter_refs == ("detector",)
