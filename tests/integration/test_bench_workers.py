"""`epp bench workers` end to end, small: every configuration serves picks without errors."""

from __future__ import annotations

import json
from pathlib import Path

from epp.bench.workersbench import bench_workers


async def test_bench_workers_measures_each_configuration(tmp_path: Path) -> None:
    result = await bench_workers(tmp_path, workers=(0, 1), rounds=1, seconds=1.0, connections=2, streams=2,
                                 tokens=(0, 8), observed=True)
    rows = {(r["workers"], r["tokens"], r["observed"]): r for r in result["rows"]}
    assert set(rows) == {(w, t, o) for w in (0, 1) for t, o in ((0, False), (8, False), (1, True), (8, True))}
    for r in rows.values():
        assert r["picks"] > 50 and r["errors"] == 0
        assert r["state_cpu_us_per_pick"] > 0 and r["client_cores"] > 0
    assert rows[(1, 0, False)]["workers_cpu_us_per_pick"] > 0 and rows[(0, 0, False)]["workers_cpu_us_per_pick"] == 0
    assert rows[(0, 0, False)]["vs_one_process"] == 1.0
    assert rows[(1, 8, True)]["workers_cpu_us_per_pick"] > 0  # each request's three streams, through the worker
    assert json.loads((tmp_path / "workers.json").read_text())["rows"] == result["rows"]
    assert "8-token stream" in (tmp_path / "workers.md").read_text()
    assert "8-token stream, observed" in (tmp_path / "workers.md").read_text()
