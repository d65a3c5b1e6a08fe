"""Routing-benchmark traces: seeded, replayable, and the share no router can serve from cache."""

from __future__ import annotations

from pathlib import Path

import pytest

from epp.bench.workloads import Session, Trace, build


def test_the_same_seed_builds_the_same_trace_and_a_saved_trace_replays(tmp_path: Path) -> None:
    a = build("mix", 300, 50.0, seed=3)
    assert a == build("mix", 300, 50.0, seed=3) and a != build("mix", 300, 50.0, seed=4)
    assert a.requests >= 300 and {s.kind for s in a.sessions} == {"zipf", "hot", "multiturn"}
    a.save(tmp_path / "t.json")
    assert Trace.load(tmp_path / "t.json") == a
    with pytest.raises(ValueError, match="unknown workload"):
        build("nope", 10, 1.0)


def test_first_seen_share_counts_each_distinct_system_prompt_once() -> None:
    trace = Trace("mix", 1, 1.0, [Session(0.0, "s1", ["q"], 8), Session(0.1, "s2", ["q", "q2", "q3"], 8),
                                  Session(0.2, "s1", ["q"], 8), Session(0.3, "s3", ["q"], 8)])
    assert trace.requests == 6 and trace.first_seen_share() == 3 / 6
    assert Trace("mix", 1, 1.0).first_seen_share() == 0.0
