"""``--workers``: how many, by default and as given."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from epp.cli import _worker_count, build_parser
from epp.server.workers import AUTO_CAP, available_cores, default_workers


def test_auto_is_a_worker_per_core_capped_and_none_on_one_core() -> None:
    assert default_workers(1) == 0
    assert default_workers(2) == 2 and default_workers(4) == 4
    assert default_workers(64) == AUTO_CAP


def test_available_cores_reads_the_cgroup_limit(tmp_path: Path) -> None:
    affinity = len(os.sched_getaffinity(0))
    limit = tmp_path / "cpu.max"
    limit.write_text("max 100000\n")
    assert available_cores(limit) == affinity
    limit.write_text("150000 100000\n")  # 1.5 CPUs: two cores' worth of processes can run
    assert available_cores(limit) == min(affinity, 2)
    limit.write_text("50000 100000\n")
    assert available_cores(limit) == 1
    assert available_cores(tmp_path / "missing") == affinity


def test_the_flag() -> None:
    def count(*extra: str) -> int:
        return _worker_count(build_parser().parse_args(["serve", "--endpoints", "a:1", *extra]))

    assert count() == default_workers()
    assert count("--workers", "0") == 0 and count("--workers", "3") == 3
    assert count("--workers", "auto") == default_workers()
    assert count("--grpc-port", "0") == 0  # the workers need a fixed port to share
    for bad in ("-1", "65", "many"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["serve", "--endpoints", "a:1", "--workers", bad])
