"""The link directories of serving processes killed outright are swept at the next start."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from epp.server.workers import LINK_DIR_PREFIX, sweep_link_dirs


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_only_the_directories_of_processes_that_no_longer_run_are_removed(tmp_path: Path) -> None:
    dead = tmp_path / f"{LINK_DIR_PREFIX}{_dead_pid()}-x1"
    live = tmp_path / f"{LINK_DIR_PREFIX}{os.getpid()}-x2"
    old_style = tmp_path / f"{LINK_DIR_PREFIX}abc123"  # not named for a pid: not known to be ours
    other = tmp_path / "something-else-1-x"
    for d in (dead, live, old_style, other):
        d.mkdir()
        (d / "link.sock").write_bytes(b"")
    assert sweep_link_dirs(tmp_path) == [dead]
    assert not dead.exists()
    assert live.exists() and old_style.exists() and other.exists()
    assert sweep_link_dirs(tmp_path) == []
