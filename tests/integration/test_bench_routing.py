"""`epp bench routing` smoke run: every contender completes a small trace and the result files
are written (the benchmark cannot rot). Peers are installed into .venv-peers on first use."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from epp.bench.routing import CONTENDERS, RoutingOptions, bench_routing
from epp.bench.workloads import WorkloadParams

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(600)
async def test_every_contender_completes_a_small_trace(tmp_path: Path) -> None:
    opts = RoutingOptions(preset="fast", servers=2, loads=(0.5,), requests=24, capacity_seconds=2.0,
                          max_seconds=30.0, params=WorkloadParams(groups=4, prefix_tokens=200, output_tokens=8,
                                                                 turns=2, think_s=0.05), progress=False)
    result = await bench_routing(tmp_path, opts, venvs=ROOT / ".venv-peers")
    ran = {r["contender"]: r for r in result["rows"]}
    for name in ("envoy-round-robin", "envoy-least-request", "epp"):
        assert name in ran
    for name in CONTENDERS:
        if name in result["unavailable"]:  # a peer that could not be installed says why
            assert name in ("vllm-router", "sglang-router") and result["unavailable"][name]
            continue
        row = ran[name]
        assert row["requests"] >= 24 and row["errors"] == 0, row
        assert sum(row["per_server_requests"]) >= 24 and row["ttft_p90_s"] > 0
        assert 0 <= row["cold_share"] <= 1 and row["ttft_p90_warm_s"] >= 0
        logged = json.loads((tmp_path / "logs" / f"{name}-0.5" / "requests.json").read_text())
        assert len(logged) == row["requests"]
        # Every request is found in its pod's timings, and its legs happen in order on one clock.
        assert row["ttft_split_ms"]["matched"] == row["requests"]
        assert all(len(r["legs_s"]) == 4 and min(r["legs_s"]) >= 0 for r in logged)
    for f in ("routing.json", "routing.md", "ttft_cdf.png", "throughput_vs_load.png", "server_load.png"):
        assert (tmp_path / f).stat().st_size > 0
    meta = json.loads((tmp_path / "routing.json").read_text())["meta"]
    assert meta["workload"] == "mix" and 0 < meta["first_seen_share"]["0.5"] < 1
    assert "Where the tail comes from" in (tmp_path / "routing.md").read_text()
    assert "Where each TTFT goes" in (tmp_path / "routing.md").read_text()
    assert (tmp_path / "trace-mix-0.5.json").stat().st_size > 0


@pytest.mark.timeout(300)
async def test_a_run_whose_fleet_ran_late_is_repeated_once(tmp_path: Path) -> None:
    # A negative limit: every run counts as late, so each contender runs exactly twice.
    opts = RoutingOptions(preset="fast", servers=2, loads=(0.5,), requests=12, capacity_rps=20.0,
                          contenders=("envoy-round-robin",), late_limit_ms=-1.0, max_seconds=30.0,
                          params=WorkloadParams(groups=4, prefix_tokens=200, output_tokens=8, turns=2, think_s=0.05),
                          progress=False)
    result = await bench_routing(tmp_path, opts, venvs=ROOT / ".venv-peers")
    [row] = result["rows"]
    assert row["runs"] == 2 and row["errors"] == 0 and result["meta"]["capacity_given"]
    assert "Run twice because the simulated GPUs ran late" in (tmp_path / "routing.md").read_text()


@pytest.mark.timeout(300)
async def test_active_active_contenders_run_and_a_killed_replica_fails_nothing_sent_after(tmp_path: Path) -> None:
    """Two replicas sharing through a real Redis, and the two without it, complete a trace; the
    shared one has a replica SIGKILLed mid-run: nothing sent after the kill fails."""
    from epp.stack.replicas import redis_binary

    if redis_binary() is None:
        pytest.fail("no redis-server: `make redis` installs it (part of `make test`)")
    opts = RoutingOptions(preset="fast", servers=2, loads=(0.5,), requests=60, capacity_rps=20.0,
                          contenders=("epp-active-active", "epp-active-active-unshared"), kill_replica_at=2.0,
                          max_seconds=30.0, params=WorkloadParams(groups=4, prefix_tokens=200, output_tokens=8,
                                                                 turns=2, think_s=0.05), progress=False)
    result = await bench_routing(tmp_path, opts, venvs=ROOT / ".venv-peers")
    ran = {r["contender"]: r for r in result["rows"]}
    assert set(ran) == {"epp-active-active", "epp-active-active-unshared"}, result["unavailable"]
    shared = ran["epp-active-active"]
    assert shared["store_used_mb"] > 0 and "store_used_mb" not in ran["epp-active-active-unshared"]
    killed = shared["replica_killed"]
    assert killed["sent_after"] > 10 and killed["failed_sent_after"] == 0, killed
    assert shared["errors"] == killed["failed_sent_before"]  # only what the killed replica held
    assert "One replica SIGKILLed under load" in (tmp_path / "routing.md").read_text()
    assert all(r["fleet_ttft_p90_s"] > 0 for r in result["rows"])
