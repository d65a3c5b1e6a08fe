"""`epp bench pool` at a small scale: every part of the report comes from a real run."""

from __future__ import annotations

from pathlib import Path

from epp.bench.poolbench import bench_pool


async def test_the_pool_bench_measures_scraping_picking_and_memory(tmp_path: Path) -> None:
    r = await bench_pool(tmp_path, servers=20, interval=0.05, seconds=1.0, blocks=20_000)
    assert r["picking"]["candidates"] == 20 and 0 < r["picking"]["pick_p50_us"] <= r["picking"]["pick_p99_us"]
    assert r["memory"]["index_size"] == r["memory"]["blocks_recorded"] > 19_000  # nothing evicted
    s = r["scraping"]
    assert s["scrapes_wanted_per_s"] == 400 and s["scrapes_per_s"] > 100 and s["cpu_us_per_scrape"] > 0
    f = r["scraping_full_rate"]
    assert f["scrapes_per_s"] > 100 and f["exposition_bytes"] > 1000 and f["cpu_us_per_scrape"] > 0
    report = (tmp_path / "pool.md").read_text()
    assert "| pick (default profile" in report and "full rate (a fast-preset pod's" in report
