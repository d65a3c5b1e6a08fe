"""`epp bench overhead`: what the picker adds to a request, measured side by side in one run.

Contenders, all in front of the same fast simulated fleet: Envoy alone (round robin) and Envoy +
epp (FULL_DUPLEX_STREAMED, the gateway mode; BUFFERED optionally). Each runs at concurrency 1
and 16 with the same 2.4 KB completion request, and (``stream_tokens``, 64) at concurrency 16
with the same request streamed: an SSE event per token, so every response chunk crosses the
picker, as gateways configure it. Picker CPU per request comes from the CPU time of the epp
process and its workers (/proc), over the requests of that run. Then, in process, what the default
profile and predicted-latency scoring cost per pick for 8, 32 and 128 candidates
(``epp.bench.schedcost``).
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from epp.bench.gatewaybench import front_door_cost, front_door_instructions, front_door_parts, shadow_cost
from epp.bench.loadgen import request_body, run_load
from epp.bench.procs import checkout_env, cpu_seconds, start_epp, start_sim, stop, tree_cpu_seconds
from epp.bench.schedcost import markdown as cost_markdown
from epp.bench.schedcost import scheduling_cost
from epp.stack.local import EnvoyProc, free_ports, start_envoy


@dataclass
class Row:
    contender: str
    concurrency: int
    requests: int
    errors: int
    rps: float
    p50_ms: float
    p99_ms: float
    added_p50_ms: float | None
    picker_cpu_us_per_req: float | None
    envoy_cpu_us_per_req: float
    stream_tokens: int = 0  # the response: one token (0), or an SSE stream of this many tokens


async def _measure(name: str, envoy: EnvoyProc, epp: subprocess.Popen[bytes] | None, body: bytes, concurrency: int,
                   requests: int, max_seconds: float) -> Row:
    epp_cpu0 = tree_cpu_seconds(epp.pid) if epp else 0.0
    env_cpu0 = cpu_seconds(envoy.proc.pid)
    res = await run_load("127.0.0.1", envoy.listen_port, "/v1/completions", body, concurrency=concurrency,
                         requests=requests, max_seconds=max_seconds)
    n = max(len(res.latencies), 1)
    picker = (tree_cpu_seconds(epp.pid) - epp_cpu0) / n * 1e6 if epp else None
    env = (cpu_seconds(envoy.proc.pid) - env_cpu0) / n * 1e6
    return Row(name, concurrency, len(res.latencies), res.errors, round(res.rps, 1),
               round(res.percentile(50) * 1e3, 3), round(res.percentile(99) * 1e3, 3), None,
               None if picker is None else round(picker, 1), round(env, 1))


def markdown(rows: list[Row], meta: dict[str, Any]) -> str:
    lines = [f"# epp bench overhead ({meta['date']}, {meta['machine']})", "",
             "| contender | conc | requests | errors | req/s | p50 ms | p99 ms | added p50 ms | picker CPU us/req "
             "| Envoy CPU us/req |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        added = "-" if r.added_p50_ms is None else f"{r.added_p50_ms:+.3f}"
        picker = "-" if r.picker_cpu_us_per_req is None else f"{r.picker_cpu_us_per_req:.0f}"
        name = f"{r.contender}, {r.stream_tokens}-token streams" if r.stream_tokens else r.contender
        lines.append(f"| {name} | {r.concurrency} | {r.requests} | {r.errors} | {r.rps:.0f} | {r.p50_ms:.3f} "
                     f"| {r.p99_ms:.3f} | {added} | {picker} | {r.envoy_cpu_us_per_req:.0f} |")
    return "\n".join(lines) + "\n"


async def bench_overhead(out: Path, *, servers: int = 4, requests: int = 3000, max_seconds: float = 20.0,
                         rounds: int = 2, buffered: bool = False, baseline_src: Path | None = None,
                         profile_with: str | None = None, profile_concurrency: int = 16,
                         stream_tokens: int = 64, body_skips: bool = False, observed: bool = False) -> list[Row]:
    """``baseline_src``: a checkout of another epp version (with its generated epp/v1), run as one
    more contender in the same rounds, so a change is measured side by side with its baseline.
    ``body_skips``: two more, a gateway that buffers the request and streams the response to the
    picker, and the same allowing mode overrides with an epp that asks to skip unread bodies.
    ``observed``: three more: one process each (--workers 0) in full duplex and with the response
    read by observer filters (envoy/epp-observed.yaml, --observed-responses), and observed with the
    default workers."""
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="epp-bench-") as tmp:
        work = Path(tmp)
        ports = free_ports(servers + 18)
        sim_ports, (grpc_port, health_port, metrics_port) = ports[:servers], ports[servers : servers + 3]
        endpoints = [f"127.0.0.1:{p}" for p in sim_ports]
        procs: list[subprocess.Popen[bytes]] = []
        envoys: list[EnvoyProc] = []
        try:
            procs.append(await start_sim(sim_ports, work))
            epp = await start_epp(endpoints, grpc_port, health_port, metrics_port, work)
            procs.append(epp)
            contenders: list[tuple[str, EnvoyProc, subprocess.Popen[bytes] | None]] = []
            rr = await start_envoy("round-robin", work, endpoints=endpoints)
            envoys.append(rr)
            contenders.append(("envoy round-robin", rr, None))
            fd = await start_envoy("epp-full-duplex", work, epp_port=grpc_port)
            envoys.append(fd)
            contenders.append(("envoy + epp (full duplex)", fd, epp))
            if buffered:
                bf = await start_envoy("epp-buffered", work, epp_port=grpc_port)
                envoys.append(bf)
                contenders.append(("envoy + epp (buffered)", bf, epp))
            if baseline_src is not None:
                b_grpc, b_health, b_metrics = ports[servers + 3 : servers + 6]
                bdir = work / "baseline"
                bdir.mkdir()
                env = checkout_env(baseline_src)
                baseline = await start_epp(endpoints, b_grpc, b_health, b_metrics, bdir, env=env)
                procs.append(baseline)
                be = await start_envoy("epp-full-duplex", work, epp_port=b_grpc)
                envoys.append(be)
                contenders.append(("envoy + epp baseline (full duplex)", be, baseline))
            if body_skips:
                streamed_response = {"processing_mode": {"request_body_mode": "BUFFERED",
                                                         "response_body_mode": "STREAMED"}}
                sr = await start_envoy("epp-buffered", work, epp_port=grpc_port, ext_proc=streamed_response)
                envoys.append(sr)
                contenders.append(("envoy + epp (response streamed)", sr, epp))
                s_grpc, s_health, s_metrics = ports[servers + 6 : servers + 9]
                sdir = work / "skips"
                sdir.mkdir()
                skipper = await start_epp(endpoints, s_grpc, s_health, s_metrics, sdir,
                                          ("--allow-mode-override=true",))
                procs.append(skipper)
                sk = await start_envoy("epp-buffered", work, epp_port=s_grpc,
                                       ext_proc={**streamed_response, "allow_mode_override": True})
                envoys.append(sk)
                contenders.append(("envoy + epp (response streamed, body skipped)", sk, skipper))
            if observed:
                for k, (name, template, flags) in enumerate((
                        ("envoy + epp (full duplex, one process)", "epp-full-duplex", ("--workers", "0")),
                        ("envoy + epp (observed responses, one process)", "epp-observed",
                         ("--workers", "0", "--observed-responses")),
                        ("envoy + epp (observed responses)", "epp-observed", ("--observed-responses",)))):
                    o_grpc, o_health, o_metrics = ports[servers + 9 + 3 * k : servers + 12 + 3 * k]
                    odir = work / f"one-process-{k}"
                    odir.mkdir()
                    one = await start_epp(endpoints, o_grpc, o_health, o_metrics, odir, flags)
                    procs.append(one)
                    oe = await start_envoy(template, work, epp_port=o_grpc)
                    envoys.append(oe)
                    contenders.append((name, oe, one))
            body = request_body()
            for _, envoy, _ in contenders:  # warm up connections and code paths
                await run_load("127.0.0.1", envoy.listen_port, "/v1/completions", body, concurrency=4, requests=300,
                               max_seconds=10)
            samples: dict[tuple[str, int, int], list[Row]] = {}
            profiler = None
            for rnd in range(rounds):
                for conc in (1, 16):
                    for name, envoy, picker in contenders:
                        wanted = conc == profile_concurrency and rnd == rounds - 1
                        if profile_with and picker is not None and wanted and not profiler:
                            profiler = subprocess.Popen(
                                [profile_with, "record", "--pid", str(picker.pid), "--rate", "500", "--format", "raw",
                                 "--output", str(out / "profile.txt"), "--nonblocking"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                            await asyncio.sleep(1.0)
                        row = await _measure(name, envoy, picker, body, conc, requests if conc == 16 else requests // 2,
                                             max_seconds)
                        if profiler is not None and profiler.poll() is None:
                            profiler.send_signal(2)
                            profiler.wait(30)
                        samples.setdefault((name, conc, 0), []).append(row)
                if stream_tokens:  # gateway mode with token streams: every chunk crosses the picker
                    streamed = request_body(stream_tokens=stream_tokens)
                    for name, envoy, picker in contenders:
                        row = await _measure(name, envoy, picker, streamed, 16, max(requests // 4, 16), max_seconds)
                        row.stream_tokens = stream_tokens
                        samples.setdefault((name, 16, stream_tokens), []).append(row)
            rows = [_median_row(v) for v in samples.values()]
            base = {(r.concurrency, r.stream_tokens): r.p50_ms for r in rows if r.contender == "envoy round-robin"}
            for r in rows:
                if r.contender != "envoy round-robin":
                    r.added_p50_ms = round(r.p50_ms - base[(r.concurrency, r.stream_tokens)], 3)
            rows.sort(key=lambda r: (r.stream_tokens, r.concurrency, r.contender))
        finally:
            for e in envoys:
                e.stop()
            for p in procs:
                stop(p)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.machine()}, {_cpus()} cores",
            "python": platform.python_version(), "servers": servers, "requests_c16": requests, "rounds": rounds}
    # What a profile costs per pick in process, the default one and with predicted-latency scoring.
    costs = scheduling_cost()
    # What the gateway's front door (API key, limits, metering) adds to a pick, in process.
    front, parts = front_door_cost(), front_door_parts()
    counted = await asyncio.to_thread(front_door_instructions)  # callgrind, when valgrind is there
    shadows = shadow_cost()
    (out / "overhead.json").write_text(json.dumps({"meta": meta, "rows": [asdict(r) for r in rows],
                                                   "scheduling_cost": [asdict(c) for c in costs],
                                                   "front_door_cost_us": front, "front_door_parts_us": parts,
                                                   "front_door_instructions": counted, "shadow_cost_us": shadows},
                                                  indent=1))
    (out / "overhead.md").write_text(markdown(rows, meta) + "\nScheduling cost in process (the pick path: "
                                     "schedule + commit; the response path: first bytes + end, where the latency "
                                     "model learns):\n\n" + cost_markdown(costs)
                                     + "\n\nThe gateway's front door on top of the pick, in process (us per request): "
                                     + ", ".join(f"{k} {v}" for k, v in front.items()) + "; step by step: "
                                     + ", ".join(f"{k} {v}" for k, v in parts.items())
                                     + (f"; counted by callgrind: +{counted['added']:,.0f} instructions per request "
                                        f"(+{counted['added_pct']}% of the pick path's "
                                        f"{counted['pick']:,.0f})" if counted else "") + "\n"
                                     + "\nShadow evaluation on top of the pick, every request sampled, in process "
                                     "(us per request): " + ", ".join(f"{k} {v}" for k, v in shadows.items()) + "\n")
    return rows


def _median_row(rows: list[Row]) -> Row:
    """The run with the median p50 (keeps each row's numbers consistent with each other)."""
    return sorted(rows, key=lambda r: r.p50_ms)[len(rows) // 2]


def _cpus() -> int:
    return os.cpu_count() or 0
