"""`epp bench gateway` runs end to end (small): nginx as seed 000 configures it (its key check
included), `epp gateway` with and without keys and metering, every contender answering 200."""

from __future__ import annotations

import json
from pathlib import Path

import aiohttp
import pytest

from epp.bench import gatewaybench
from epp.bench.procs import start_sim, stop
from epp.stack.local import free_ports

try:
    gatewaybench.nginx_binary()
    HAVE_NGINX = True
except FileNotFoundError:
    HAVE_NGINX = False

pytestmark = pytest.mark.skipif(not HAVE_NGINX, reason="nginx is not installed (make nginx installs it)")


async def test_nginx_contender_checks_the_key(tmp_path: Path) -> None:
    ports = free_ports(2)
    sim = await start_sim(ports[:1], tmp_path)
    nginx = None
    try:
        nginx = await gatewaybench.start_nginx(tmp_path, ports[1], [f"127.0.0.1:{ports[0]}"])
        body = b'{"model": "sim-model", "prompt": "hi", "max_tokens": 1}'
        async with aiohttp.ClientSession() as s:
            async with s.post(f"http://127.0.0.1:{ports[1]}/v1/completions", data=body) as r:
                assert r.status == 401
            async with s.post(f"http://127.0.0.1:{ports[1]}/v1/completions", data=body,
                              headers={"authorization": f"Bearer {gatewaybench.KEY}"}) as r:
                assert r.status == 200
    finally:
        if nginx is not None:
            stop(nginx)
        stop(sim)


async def test_bench_gateway_small(tmp_path: Path) -> None:
    rows = await gatewaybench.bench_gateway(tmp_path, servers=2, requests=32, rounds=1, stream_tokens=4,
                                            instructions=False)
    names = {r.contender for r in rows}
    assert len(names) == 3 and len(rows) == 9
    assert all(r.errors == 0 and r.requests > 0 for r in rows), rows
    data = json.loads((tmp_path / "gateway.json").read_text())
    assert data["front_door_parts_us"]["sum"] > 0 and "pick" in data["front_door_cost_us"]
    assert "nginx (seed 000)" in (tmp_path / "gateway.md").read_text()
