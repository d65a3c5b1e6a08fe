"""`epp bench gateway`: `epp gateway` against nginx as seed 000 configures it, side by side.

Contenders, in front of the same simulated fleet, each a real process (one worker each, so CPU
per request compares like for like):
- nginx: the seed's front door: a bearer-key check (`if ($http_authorization != ...) return 401`),
  proxy_pass to the pool (round robin), proxy_http_version 1.1, timeouts 10 s / 300 s, no buffering;
- `epp gateway` with API keys (a key with request, token and concurrency limits) and usage
  metering to a file: auth + limits + metering + the pick;
- `epp gateway` without keys and metering: the pick alone.
Each at concurrency 1 and 16 with a 2.4 KB completion request, and with 64-token SSE streams at 16.
CPU per request: the proxy's processes (nginx master + workers; the picker and its Envoy) from /proc.

Then, in process (no I/O, so the difference is not lost in noise): what auth + limits + metering
add to the director's path per request (submit + response end), with and without them.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import platform
import shutil
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp

from epp.bench.loadgen import request_body, run_load
from epp.bench.procs import cpu_seconds, start_sim, stop, tree_cpu_seconds
from epp.stack.local import epp_command, free_ports, spawn, wait_until

KEY = "sk-bench-0123456789abcdef"

NGINX_CONF = """\
worker_processes 1;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {prefix}/body;
  proxy_temp_path {prefix}/proxy;
  fastcgi_temp_path {prefix}/fastcgi;
  uwsgi_temp_path {prefix}/uwsgi;
  scgi_temp_path {prefix}/scgi;
  client_max_body_size 16m;
  upstream vllm {{
{servers}    keepalive 64;
  }}
  server {{
    listen 127.0.0.1:{port};
    location = /healthz {{ access_log off; return 200 "ok"; }}
    location /v1/ {{
      if ($http_authorization != "Bearer {key}") {{ return 401; }}
      proxy_pass http://vllm;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host $host;
      proxy_set_header X-Real-IP $remote_addr;
      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
      proxy_set_header X-Forwarded-Proto $scheme;
      proxy_connect_timeout 10s;
      proxy_read_timeout 300s;
      proxy_send_timeout 300s;
      proxy_buffering off;
    }}
  }}
}}
"""


@dataclass
class GatewayRow:
    contender: str
    concurrency: int
    stream_tokens: int
    requests: int
    errors: int
    rps: float
    p50_ms: float
    p99_ms: float
    proxy_cpu_us_per_req: float  # all of the contender's processes
    picker_cpu_us_per_req: float | None  # of which the picker (epp gateway only)


def nginx_binary() -> str:
    for cand in (shutil.which("nginx"), "/usr/sbin/nginx"):
        if cand and Path(cand).exists():
            return cand
    raise FileNotFoundError("nginx is missing: `make bench-gateway` installs it (apt-get install nginx)")


async def _up(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    async def ok() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"exited; see {log}")
        async with aiohttp.ClientSession() as s, s.get(url) as r:
            return r.status == 200

    await wait_until(ok, 60, url)


async def start_nginx(work: Path, port: int, endpoints: list[str]) -> subprocess.Popen[bytes]:
    prefix = work / "nginx"
    prefix.mkdir()
    servers = "".join(f"    server {e};\n" for e in endpoints)
    conf = prefix / "nginx.conf"
    conf.write_text(NGINX_CONF.format(prefix=prefix, servers=servers, port=port, key=KEY))
    proc = spawn([nginx_binary(), "-c", str(conf), "-p", str(prefix)], prefix / "stdout.log")
    await _up(f"http://127.0.0.1:{port}/healthz", proc, prefix / "error.log")
    return proc


async def start_gateway(work: Path, name: str, endpoints: list[str], keys: bool) -> tuple[subprocess.Popen[bytes], int]:
    d = work / name
    d.mkdir()
    listen, admin, grpc, health, metrics = free_ports(5)
    lines = [f"listeners: [{{port: {listen}, address: 127.0.0.1}}]",
             f"servers: {{static: [{', '.join(endpoints)}]}}",
             f"envoy: {{adminPort: {admin}, concurrency: 1}}",
             f"picker: {{grpcPort: {grpc}, healthPort: {health}, metricsPort: {metrics}}}"]
    if keys:
        digest = hashlib.sha256(KEY.encode()).hexdigest()
        (d / "keys.yaml").write_text(
            f"keys:\n- {{id: bench, sha256: {digest}, tenant: bench, limits: {{requestsPerMinute: 1000000000, "
            "tokensPerMinute: 1000000000, concurrency: 100000}}\n")
        lines += [f"apiKeys: {d / 'keys.yaml'}", f"metering: {{log: {d / 'usage.jsonl'}}}"]
    else:
        lines.append("metering: {log: false}")
    (d / "gateway.yaml").write_text("\n".join(lines) + "\n")
    proc = spawn(epp_command("gateway", "-c", str(d / "gateway.yaml"), "--workdir", str(d)), d / "gateway.log")
    await _up(f"http://127.0.0.1:{listen}/healthz", proc, d / "gateway.log")
    return proc, listen


async def _measure(name: str, proc: subprocess.Popen[bytes], port: int, picker: bool, body: bytes, conc: int,
                   requests: int, max_seconds: float, tokens: int, headers: dict[str, str]) -> GatewayRow:
    cpu0, own0 = tree_cpu_seconds(proc.pid), cpu_seconds(proc.pid)
    res = await run_load("127.0.0.1", port, "/v1/completions", body, concurrency=conc, requests=requests,
                         max_seconds=max_seconds, headers=headers)
    n = max(len(res.latencies), 1)
    total = (tree_cpu_seconds(proc.pid) - cpu0) / n * 1e6
    own = (cpu_seconds(proc.pid) - own0) / n * 1e6
    return GatewayRow(name, conc, tokens, len(res.latencies), res.errors, round(res.rps, 1),
                      round(res.percentile(50) * 1e3, 3), round(res.percentile(99) * 1e3, 3), round(total, 1),
                      round(own, 1) if picker else None)


class FrontDoorPath:
    """The picker's whole ext_proc path for one gateway-mode request, in process, as the server
    runs it: every message (request headers with the key, body, response headers with the served
    endpoint, response body with usage) parsed from its bytes and answered by the protocol state
    machine. ``front_door``: with API keys (request, token and concurrency limits), key stripping
    and usage metering; without: the pick alone."""

    def __init__(self, front_door: bool, usage_log: Path, shadows: int = 0) -> None:
        from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

        from epp.config import load_config
        from epp.datastore.endpoint import EngineSignals
        from epp.datastore.store import Datastore
        from epp.observability.metrics import PickerMetrics
        from epp.requestcontrol.apikeys import parse_keys_file
        from epp.requestcontrol.director import Director
        from epp.requestcontrol.ejections import Ejections
        from epp.requestcontrol.metering import Metering
        from epp.server.extproc import SERVED_KEY, ExtProcStream

        self._pb, self._stream = pb, ExtProcStream
        addresses = [f"10.0.0.{i}:8000" for i in range(8)]
        store = Datastore()
        store.set_endpoints(addresses)
        for a in addresses:
            store.record_scrape(a, EngineSignals(), 0)
        scheduler, _ = load_config(None).build()
        d = self.director = Director(store, scheduler, PickerMetrics(store))
        d.ejections = Ejections(5, 30.0, time.monotonic)
        if shadows:  # candidate configs (the default profile again) scheduling every request too
            from epp.requestcontrol.shadow import ShadowEvaluation

            d.shadow = ShadowEvaluation([(f"candidate-{i}", load_config(None).build()[0]) for i in range(shadows)])
        if front_door:
            digest = hashlib.sha256(KEY.encode()).hexdigest()
            d.keys = parse_keys_file(f"keys:\n- {{id: bench, sha256: {digest}, tenant: bench, limits: "
                                     "{requestsPerMinute: 1000000000, tokensPerMinute: 1000000000, "
                                     "concurrency: 100000}}\n", "<bench>")
            d.strip_keys = True
            d.metering = Metering(str(usage_log))
        body = request_body()
        tail = (b'{"id":"x","choices":[{"text":"a"}],"usage":{"prompt_tokens":600,"completion_tokens":1,'
                b'"prompt_tokens_details":{"cached_tokens":512}}}')

        def messages(i: int) -> list[bytes]:
            h = pb.HttpHeaders()
            for k, v in ((":path", "/v1/completions"), (":method", "POST"), ("content-type", "application/json"),
                         ("content-length", str(len(body))), ("authorization", f"Bearer {KEY}"),
                         ("x-request-id", f"req-{i}")):
                h.headers.headers.add(key=k, raw_value=v.encode())
            first = pb.ProcessingRequest(request_headers=h)
            first.protocol_config.request_body_mode = 4  # FULL_DUPLEX_STREAMED, both ways
            first.protocol_config.response_body_mode = 4
            rh = pb.HttpHeaders()
            for k, v in ((":status", "200"), ("content-type", "application/json"), (SERVED_KEY, addresses[i % 8])):
                rh.headers.headers.add(key=k, raw_value=v.encode())
            return [m.SerializeToString() for m in (
                first, pb.ProcessingRequest(request_body=pb.HttpBody(body=body)),
                pb.ProcessingRequest(request_body=pb.HttpBody(end_of_stream=True)),
                pb.ProcessingRequest(response_headers=rh),
                pb.ProcessingRequest(response_body=pb.HttpBody(body=tail)),
                pb.ProcessingRequest(response_body=pb.HttpBody(end_of_stream=True)))]

        self._wire = [messages(i) for i in range(64)]

    def run(self, n: int) -> float:
        """``n`` requests; microseconds per request."""
        parse, wire, stream_of, d = self._pb.ProcessingRequest.FromString, self._wire, self._stream, self.director
        t0 = time.perf_counter()
        for i in range(n):
            stream = stream_of(d)
            for raw in wire[i % 64]:
                stream.on_message(parse(raw))
            stream.close()
        return (time.perf_counter() - t0) / n * 1e6

    def close(self) -> None:
        if self.director.metering is not None:
            self.director.metering.close()


def front_door_cost(requests: int = 1000, rounds: int = 7) -> dict[str, float]:
    """Microseconds per request of ``FrontDoorPath`` without and with the front door; best of
    ``rounds``, interleaved so a disturbance of the machine hits both."""
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        contenders = {"pick": FrontDoorPath(False, Path(tmp) / "u0.jsonl"),
                      "pick + auth + limits + metering": FrontDoorPath(True, Path(tmp) / "u1.jsonl")}
        for c in contenders.values():
            c.run(500)  # warm up
        for _ in range(rounds):
            for name, c in contenders.items():
                out[name] = round(min(out.get(name, float("inf")), c.run(requests)), 1)
        for c in contenders.values():
            c.close()
    out["added"] = round(out["pick + auth + limits + metering"] - out["pick"], 1)
    return out


def shadow_cost(requests: int = 1000, rounds: int = 7) -> dict[str, float]:
    """Microseconds per request of ``FrontDoorPath`` (the pick alone) without and with one and two
    shadow configs scheduling every request (sample rate 1: the bound; a rate r costs r times the
    difference). Best of ``rounds``, interleaved."""
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        contenders = {f"{n} shadow configs": FrontDoorPath(False, Path(tmp) / f"u{n}.jsonl", shadows=n)
                      for n in (0, 1, 2)}
        for c in contenders.values():
            c.run(500)
        for _ in range(rounds):
            for name, c in contenders.items():
                out[name] = round(min(out.get(name, float("inf")), c.run(requests)), 1)
    out["added per shadow config"] = round((out["2 shadow configs"] - out["0 shadow configs"]) / 2, 1)
    return out


def front_door_instructions(requests: int = 1000) -> dict[str, float] | None:
    """Instructions per request of ``FrontDoorPath`` without and with the front door, counted by
    valgrind's callgrind (the same count whatever else the machine does): each contender runs
    once with ``requests`` more than the other, and the difference is divided. None without
    valgrind."""
    import re
    import sys

    valgrind = shutil.which("valgrind")
    if valgrind is None:
        return None
    counts: dict[tuple[str, int], int] = {}
    with tempfile.TemporaryDirectory() as tmp:
        runs = [(which, n) for which in ("pick", "front") for n in (0, requests)]
        procs = {run: subprocess.Popen([valgrind, "--tool=callgrind", f"--callgrind-out-file={tmp}/cg.%p",
                                        sys.executable, "-m", "epp.bench.gatewaybench", run[0], str(run[1])],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                 for run in runs}
        for run, proc in procs.items():
            _, err = proc.communicate(timeout=1800)
            found = re.search(r"Collected : (\d+)", err)
            if proc.returncode != 0 or found is None:
                raise RuntimeError(f"callgrind run {run} failed: {err[-2000:]}")
            counts[run] = int(found.group(1))
    pick = (counts[("pick", requests)] - counts[("pick", 0)]) / requests
    front = (counts[("front", requests)] - counts[("front", 0)]) / requests
    return {"pick": round(pick), "pick + auth + limits + metering": round(front), "added": round(front - pick),
            "added_pct": round(100 * (front - pick) / pick, 1)}


def front_door_parts(n: int = 20000) -> dict[str, float]:
    """Microseconds per call of each front-door step alone (best of 5 timeit runs): steadier than
    the difference of two whole paths on a shared machine."""
    import timeit

    from epp.requestcontrol.apikeys import parse_keys_file
    from epp.requestcontrol.metering import Metering, UsageRecord
    from epp.requestcontrol.ratelimits import RateLimits

    digest = hashlib.sha256(KEY.encode()).hexdigest()
    table = parse_keys_file(f"keys:\n- {{id: b, sha256: {digest}, tenant: b, limits: {{requestsPerMinute: "
                            "1000000000, tokensPerMinute: 1000000000, concurrency: 100000}}\n", "<bench>")
    headers = {"authorization": f"Bearer {KEY}"}
    key = table.check(headers)
    limits = RateLimits(time.monotonic)

    class Owner:
        pass

    with tempfile.TemporaryDirectory() as tmp:
        metering = Metering(str(Path(tmp) / "usage.jsonl"))
        record = UsageRecord("req-1", "b", "b", "sim-model", "10.0.0.1:8000", 200, 600, 1, 512, 0.01, 0.02)
        steps = {"auth (hash + look-up + compare)": lambda: table.check(headers),
                 "requests + tokens per minute (admit)": lambda: limits.admit(key),
                 "concurrency slot (acquire + release)": lambda: limits.acquire(key, Owner()).release(),  # type: ignore[union-attr]
                 "x-ratelimit-* response headers": lambda: limits.headers(key),
                 "tokens charged at the end": lambda: limits.charge(key, 601),
                 "metering (counters + JSON line written)": lambda: metering.record(record)}
        out = {name: round(min(timeit.repeat(f, number=n, repeat=5)) / n * 1e6, 2) for name, f in steps.items()}
        metering.close()
    out["sum"] = round(sum(out.values()), 1)
    return out


def markdown(rows: list[GatewayRow], cost: dict[str, float], meta: dict[str, Any],
             parts: dict[str, float] | None = None, counted: dict[str, float] | None = None) -> str:
    lines = [f"# epp bench gateway ({meta['date']}, {meta['machine']})", "",
             "| contender | conc | response | requests | errors | req/s | p50 ms | p99 ms | CPU us/req (all) "
             "| of which picker |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        resp = f"{r.stream_tokens}-token SSE" if r.stream_tokens else "JSON"
        picker = "-" if r.picker_cpu_us_per_req is None else f"{r.picker_cpu_us_per_req:.0f}"
        lines.append(f"| {r.contender} | {r.concurrency} | {resp} | {r.requests} | {r.errors} | {r.rps:.0f} "
                     f"| {r.p50_ms:.3f} | {r.p99_ms:.3f} | {r.proxy_cpu_us_per_req:.0f} | {picker} |")
    lines += ["", "In process, the picker's whole ext_proc path per request (best of 7 interleaved rounds): "
              + ", ".join(f"{k} {v} us" for k, v in cost.items()), ""]
    if counted:
        us = cost["pick"] * counted["added_pct"] / 100
        lines += [f"Counted by callgrind (the same whatever else the machine does): the pick path "
                  f"{counted['pick']:,.0f} instructions per request, with the front door "
                  f"{counted['pick + auth + limits + metering']:,.0f}: +{counted['added']:,.0f} "
                  f"(+{counted['added_pct']}%, about {us:.0f} us at the pick path's measured speed).", ""]
    if parts:
        lines += ["Each front-door step alone (us per request, best of 5):", "", "| step | us |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in parts.items()]
        lines.append("")
    return "\n".join(lines)


async def bench_gateway(out: Path, *, servers: int = 4, requests: int = 2000, max_seconds: float = 20.0,
                        rounds: int = 2, stream_tokens: int = 64, instructions: bool = True) -> list[GatewayRow]:
    """``instructions``: also count the front door's instructions per request under callgrind
    (~2 minutes; skipped without valgrind)."""
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="epp-bench-gw-") as tmp:
        work = Path(tmp)
        ports = free_ports(servers + 1)
        endpoints = [f"127.0.0.1:{p}" for p in ports[:servers]]
        procs: list[subprocess.Popen[bytes]] = []
        try:
            procs.append(await start_sim(ports[:servers], work))
            nginx = await start_nginx(work, ports[servers], endpoints)
            procs.append(nginx)
            full, full_port = await start_gateway(work, "gateway-keys", endpoints, keys=True)
            procs.append(full)
            plain, plain_port = await start_gateway(work, "gateway-plain", endpoints, keys=False)
            procs.append(plain)
            auth = {"authorization": f"Bearer {KEY}"}
            contenders = [("nginx (seed 000)", nginx, ports[servers], False, auth),
                          ("epp gateway: keys + limits + metering", full, full_port, True, auth),
                          ("epp gateway: pick only", plain, plain_port, True, {})]
            body = request_body()
            for _, _, port, _, headers in contenders:  # warm up
                res = await run_load("127.0.0.1", port, "/v1/completions", body, concurrency=4, requests=200,
                                     max_seconds=10, headers=headers)
                if res.statuses.get(200, 0) == 0:
                    raise RuntimeError(f"warm-up on port {port} got no 200: {res.statuses}")
            samples: dict[tuple[str, int, int], list[GatewayRow]] = {}
            for _ in range(rounds):
                cases = [(1, 0, body, requests // 2), (16, 0, body, requests)]
                if stream_tokens:
                    cases.append((16, stream_tokens, request_body(stream_tokens=stream_tokens), max(requests // 4, 16)))
                for conc, tokens, b, n in cases:
                    for name, proc, port, picker, headers in contenders:
                        row = await _measure(name, proc, port, picker, b, conc, n, max_seconds, tokens, headers)
                        samples.setdefault((name, conc, tokens), []).append(row)
            rows = [sorted(v, key=lambda r: r.p50_ms)[len(v) // 2] for v in samples.values()]
        finally:
            for p in reversed(procs):
                stop(p)
    cost = front_door_cost()
    parts = front_door_parts()
    counted = await asyncio.to_thread(front_door_instructions) if instructions else None
    meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.machine()}, {_cores()} cores",
            "servers": servers, "requests_c16": requests, "rounds": rounds}
    (out / "gateway.json").write_text(json.dumps({"meta": meta, "rows": [asdict(r) for r in rows],
                                                  "front_door_cost_us": cost, "front_door_parts_us": parts,
                                                  "front_door_instructions": counted}, indent=1))
    (out / "gateway.md").write_text(markdown(rows, cost, meta, parts, counted))
    return rows


def _cores() -> int:
    import os

    return len(os.sched_getaffinity(0))


def _run_path(which: str, n: int) -> None:
    """One ``FrontDoorPath`` run (what ``front_door_instructions`` counts): a warm-up, then ``n``."""
    async def main() -> None:  # in a running loop, as the server (usage lines are batched on it)
        with tempfile.TemporaryDirectory() as tmp:
            path = FrontDoorPath(which == "front", Path(tmp) / "usage.jsonl")
            path.run(300)
            if n:
                path.run(n)
            path.close()

    asyncio.run(main())


if __name__ == "__main__":
    import sys

    _run_path(sys.argv[1], int(sys.argv[2]))
