"""Child processes for benchmarks and the demo: start, wait until ready, read CPU time, stop."""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path

import aiohttp

from epp.stack.local import epp_command, spawn, wait_until

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """user + system CPU seconds of a process (from /proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def children(pid: int) -> list[int]:
    """The live child processes of ``pid`` (epp's --workers, a router's helpers)."""
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(x) for x in text.split()]


def tree_cpu_seconds(pid: int) -> float:
    """``cpu_seconds`` of a process and its live children: what a picker with workers spends."""
    total = cpu_seconds(pid)
    for child in children(pid):
        with contextlib.suppress(OSError):  # it ended meanwhile
            total += cpu_seconds(child)
    return total


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


async def start_sim(ports: list[int], workdir: Path, profile: str = "fast",
                    extra: tuple[str, ...] = ()) -> subprocess.Popen[bytes]:
    spec = ",".join(map(str, ports))
    proc = spawn(epp_command("sim", "--ports", spec, "--profile", profile, *extra), workdir / "sim.log")

    async def up() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"epp sim exited; see {workdir / 'sim.log'}")
        async with aiohttp.ClientSession() as s:
            for p in ports:
                async with s.get(f"http://127.0.0.1:{p}/health") as r:
                    if r.status != 200:
                        return False
        return True

    await wait_until(up, 60, "simulated fleet")
    return proc


def checkout_env(src: Path) -> dict[str, str]:
    """The environment that runs the epp of the checkout ``src``: on PYTHONPATH, and with
    PYTHONSAFEPATH so that ``python -m`` does not put its working directory first (run from
    another checkout, it would import that one's epp instead, and a baseline would be the
    code it is measured against)."""
    return {**os.environ, "PYTHONPATH": str(src.resolve()), "PYTHONSAFEPATH": "1"}


async def start_epp(endpoints: list[str], grpc_port: int, health_port: int, metrics_port: int, workdir: Path,
                    extra: tuple[str, ...] = (), env: dict[str, str] | None = None,
                    endpoints_file: Path | None = None) -> subprocess.Popen[bytes]:
    """epp serving ``endpoints`` (or the ``endpoints_file`` it watches), ready once each one's
    metrics are fresh."""
    where = ("--endpoints-file", str(endpoints_file)) if endpoints_file else ("--endpoints", ",".join(endpoints))
    args = epp_command("serve", *where, "--secure-serving=false", "--host", "127.0.0.1",
                       "--grpc-port", str(grpc_port), "--grpc-health-port", str(health_port),
                       "--metrics-port", str(metrics_port), *extra)
    proc = spawn(args, workdir / "epp.log", env)
    # From an endpoints file epp reads the endpoints itself: ready once it serves metrics.
    want = 'inference_pool_ready_pods{name="default"}' if endpoints_file else \
        f'inference_pool_ready_pods{{name="default"}} {float(len(endpoints))}'

    async def ready() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"epp serve exited; see {workdir / 'epp.log'}")
        async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{metrics_port}/metrics") as r:
            return want in await r.text()

    await wait_until(ready, 60, "epp ready")
    return proc
