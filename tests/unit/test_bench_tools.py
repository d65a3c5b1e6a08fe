"""The benchmarks' own tooling."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from epp.bench.procs import checkout_env


def test_a_baseline_runs_its_own_checkout_even_from_another_one(tmp_path: Path) -> None:
    baseline = tmp_path / "baseline"
    (baseline / "epp").mkdir(parents=True)
    (baseline / "epp" / "__init__.py").write_text("")
    # run from this checkout (whose epp `python -m` would otherwise put first on the path)
    out = subprocess.run([sys.executable, "-c", "import epp; print(epp.__file__)"], env=checkout_env(baseline),
                         cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True, check=True)
    assert Path(out.stdout.strip()) == baseline / "epp" / "__init__.py"


def test_freezing_the_heap_keeps_what_exists_out_of_later_collections() -> None:
    import gc

    from epp.bench.routing import freeze_heap

    held = [[i] for i in range(1000)]  # what a trace and earlier results are to a run
    freeze_heap()
    try:
        assert gc.get_freeze_count() >= len(held)
    finally:
        gc.unfreeze()
