"""`make demo` runs `epp demo`: it must bring the stack up, route, explain, and exit cleanly here."""

from __future__ import annotations

import re
import subprocess
import sys


def test_demo_routes_and_explains() -> None:
    proc = subprocess.run([sys.executable, "-m", "epp.cli", "demo", "--no-hold"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    rows = [line for line in lines if line.startswith(("support", "coding", "burst", "GET"))]
    assert len(rows) == 16 and all(" 200 " in r for r in rows)
    # The pinned-busy pod-4 is never chosen; a shared prefix group stays on one pod.
    assert not any(" pod-4 " in r for r in rows)
    pod = re.compile(r" (pod-\d) ")
    support_pods = {pod.search(r).group(1) for r in rows if r.startswith("support #")}  # type: ignore[union-attr]
    coding_pods = {pod.search(r).group(1) for r in rows if r.startswith("coding #")}  # type: ignore[union-attr]
    assert len(support_pods) == 1 and len(coding_pods) == 1
    assert any("prefix-cache-scorer=1.00" in r for r in rows)
    # Then the gateway: 401 without a key, 200 with one, 429 over the trial key's limit, every
    # request 200 while a pod is killed (the demo exits 1 otherwise), and the usage lines.
    out = proc.stdout
    assert re.search(r"no API key +401", out) and re.search(r"team-a's key +200", out)
    assert re.search(r"request 4 +429", out) and "statuses [200]" in out
    assert '"key_id":"team-a-1"' in out
