"""`epp bench routing`: routing quality of epp against Envoy and the peer routers, in one run.

For each load and each contender: a fresh simulated fleet (same preset, same ports layout), the
contender in front of it as its own process(es), and the same seeded trace (epp.bench.workloads)
driven through an OpenAI-style streaming client with open-loop arrivals. Contenders: Envoy
round robin, Envoy least-request, Envoy + epp, ``vllm-router --policy cache_aware`` and
``sglang-router`` (``smg launch``) cache_aware, each peer installed into its own venv under
``.venv-peers/`` on first use (reported "not available", with the reason, if that fails).

Routers run on their own core (the last one, when there are two or more) at a lower CPU priority
(nice 10), and the client and the simulated fleet on the others: the simulated GPUs keep their
timing however much CPU a router uses (real GPUs would), and the router's CPU cost shows in its
own column and in its latency when it runs out of its core.

Per contender: TTFT, inter-token latency and end-to-end percentiles, output tokens/s,
requests/s, errors, the fleet's prefix-cache hit rate, the requests each server got, and the
router's own CPU per request. Results: JSON, a markdown table, and PNG plots (TTFT CDF,
throughput vs load, per-server outstanding requests over time).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from epp.bench.procs import checkout_env, cpu_seconds, start_epp, stop, tree_cpu_seconds
from epp.bench.simbench import _pct
from epp.bench.workloads import Session, Trace, WorkloadParams, build
from epp.scheduling.latency_model import bucket_median
from epp.sim.fleet import Fleet
from epp.sim.profiles import fleet_params
from epp.stack.local import EnvoyProc, free_ports, spawn, start_envoy, wait_until
from epp.stack.replicas import RedisProc, redis_binary, start_envoy_for

CONTENDERS = ("envoy-round-robin", "envoy-least-request", "epp", "vllm-router", "sglang-router")
# Two epp replicas behind one Envoy, sharing picker state through a real Redis (active-active), and
# the same two without the store (the control: each routes knowing only its own picks).
REPLICA_CONTENDERS = {"epp-active-active": True, "epp-active-active-unshared": False}
WORKER_CONTENDERS = {"epp-one-process": 0, "epp-workers-2": 2}  # epp with --workers N
# With workers, Envoy opens a new ext_proc connection every 50 streams, so the kernel spreads the
# streams over the workers (one long-lived connection would land on one of them).
CYCLED_CONNECTIONS: dict[str, Any] = {"typed_extension_protocol_options": {
    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
        "common_http_protocol_options": {"max_requests_per_connection": 50},
        "explicit_http_config": {"http2_protocol_options": {"initial_stream_window_size": 16777216,
                                                            "initial_connection_window_size": 67108864}}}}}
REPLICAS = 2
PEERS = {"vllm-router": ("vllm-router==0.1.17", "vllm-router"), "sglang-router": ("sglang-router==0.3.2", "smg")}
_TEXT = re.compile(rb'"content":\s*"[^"]')
COLD_TOKENS = 1024  # a request whose server computed more prompt tokens than this counts as "cold"


@dataclass
class RequestResult:
    kind: str
    sent_s: float
    status: int
    ttft_s: float | None = None
    e2e_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    output_tokens: int = 0
    cached_tokens: int = 0
    prompt_tokens: int = 0
    dropped: str = ""  # the x-llm-d-request-dropped-reason of a refusal
    key: str = ""  # the last message's content: finds the request in the simulated pod's timings
    start: float = 0.0  # when it was sent (monotonic)
    legs_s: tuple[float, ...] = ()  # its TTFT's legs (SPLIT), when the pod's timings had it
    pod: str = ""  # the simulated pod that served it, when its timings had it

    @property
    def cold(self) -> bool:
        """The server computed a long prompt: more than ``COLD_TOKENS`` were not cached there."""
        return self.prompt_tokens - self.cached_tokens > COLD_TOKENS


@dataclass
class Running:
    """A started contender: its URL and the processes whose CPU counts as the router's."""

    url: str
    procs: list[subprocess.Popen[bytes]]
    envoy: EnvoyProc | None = None
    metrics_url: str | None = None  # epp's /metrics (the latency model's error is read from it)
    replicas: list[subprocess.Popen[bytes]] = field(default_factory=list)  # active-active pickers
    store: RedisProc | None = None  # their shared-state store

    def cpu(self) -> float:
        return sum(self.cpu_parts().values())

    def cpu_parts(self) -> dict[str, float]:
        """CPU seconds so far of each process: Envoy, the store, each replica (or the router)."""
        parts: dict[str, float] = {}
        for i, p in enumerate(self.procs):
            name = f"replica-{self.replicas.index(p)}" if p in self.replicas else \
                "store" if self.store is not None and p is self.store.proc else "router" if i == 0 else f"router-{i}"
            with contextlib.suppress(OSError, ValueError):
                parts[name] = tree_cpu_seconds(p.pid)
        if self.envoy is not None:
            with contextlib.suppress(OSError, ValueError):
                parts["envoy"] = cpu_seconds(self.envoy.proc.pid)
        return parts

    def isolate(self, cores: set[int] | None, niceness: int = 10) -> None:
        """Run the router on its own core(s) (``cores``) at a lower priority, every thread of it.

        The simulated fleet shares a process with the client; on a small machine a router's CPU
        would otherwise slow the simulated GPUs themselves, which real GPUs are not. The router's
        CPU per request is still measured and reported, and shows in its latency if it runs out
        of its core. (Linux applies priority and affinity per thread: Envoy's workers and the
        peers' runtime threads need their own calls.)"""
        pids = [p.pid for p in self.procs] + ([self.envoy.proc.pid] if self.envoy is not None else [])
        for pid in pids:
            _place(pid, cores, niceness)

    def stop(self) -> None:
        for p in self.procs:
            stop(p)
        if self.envoy is not None:
            self.envoy.stop()


def _place(pid: int, cores: set[int] | None, niceness: int | None = None) -> None:
    """Set every thread of ``pid`` to ``cores`` (if given) and ``niceness`` (if given)."""
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        tids = [pid]
    for tid in tids:
        with contextlib.suppress(OSError):
            if niceness is not None:
                os.setpriority(os.PRIO_PROCESS, tid, niceness)
            if cores:
                os.sched_setaffinity(tid, cores)


def split_cores() -> tuple[set[int], set[int] | None]:
    """(cores for the client and fleet, cores for the router): the last core goes to the router
    when there are at least two; None when the machine has one core."""
    cores = os.sched_getaffinity(0)
    if len(cores) < 2:
        return cores, None
    router = {max(cores)}
    return cores - router, router


def peer_command(name: str, venvs: Path) -> tuple[list[str] | None, str]:
    """The peer's executable, installing it into its own venv on first use; (None, why) if not."""
    spec, exe = PEERS[name]
    venv = venvs / name
    path = venv / "bin" / exe
    if path.exists():
        return [str(path)], ""
    try:
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True, timeout=120)
        out = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", spec],
                             capture_output=True, text=True, timeout=600)
    except (subprocess.SubprocessError, OSError) as e:
        return None, f"cannot create a venv for {spec}: {e}"
    if out.returncode != 0 or not path.exists():
        tail = (out.stderr or out.stdout).strip().splitlines()[-1:] or ["no output"]
        return None, f"pip install {spec} failed: {tail[0][:200]}"
    return [str(path)], ""


async def epp_behind_envoy(addresses: list[str], workdir: Path, extra: tuple[str, ...] = (),
                           env: dict[str, str] | None = None, endpoints_file: Path | None = None,
                           grpc: tuple[int, int, int] | None = None,
                           epp_cluster: dict[str, Any] | None = None, template: str = "epp-full-duplex") -> Running:
    """epp (``extra`` arguments) and Envoy in front of it (``template``: a FULL_DUPLEX one by default;
    ``epp_cluster``: fields set on its ext_proc cluster)."""
    grpc_port, health, metrics = grpc or tuple(free_ports(3))
    epp = await start_epp(addresses, grpc_port, health, metrics, workdir, extra, env=env,
                          endpoints_file=endpoints_file)
    try:
        envoy = await start_envoy(template, workdir, epp_port=grpc_port, epp_cluster=epp_cluster)
    except Exception:
        stop(epp)
        raise
    return Running(envoy.url, [epp], envoy, f"http://127.0.0.1:{metrics}/metrics")


async def epp_replicas_behind_envoy(addresses: list[str], workdir: Path, replicas: int, shared: bool,
                                    extra: tuple[str, ...] = (), env: dict[str, str] | None = None) -> Running:
    """``replicas`` epp processes (sharing state through a real Redis when ``shared``) and one
    FULL_DUPLEX Envoy with all of them in its ext_proc cluster. The store's CPU counts as the
    router's."""
    procs: list[subprocess.Popen[bytes]] = []
    pickers: list[subprocess.Popen[bytes]] = []
    redis = RedisProc(None, free_ports(1)[0], workdir)
    try:
        if shared:
            await redis.start()
            assert redis.proc is not None
            procs.append(redis.proc)
        ports: list[tuple[int, int]] = []
        for i in range(replicas):
            grpc, health, metrics = free_ports(3)
            where = workdir / f"replica-{i}"
            where.mkdir(parents=True, exist_ok=True)
            share = ("--shared-state-url", redis.url, "--shared-state-key", "epp:bench/routing") if shared else ()
            pickers.append(await start_epp(addresses, grpc, health, metrics, where, ("--workers", "0", *extra, *share),
                                           env=env))
            ports.append((grpc, health))
        procs += pickers
        envoy = await start_envoy_for("epp-full-duplex", workdir, ports)
    except Exception:
        for p in procs + pickers:
            stop(p)
        raise
    return Running(envoy.url, procs, envoy, replicas=pickers, store=redis if shared else None)


def freeze_heap() -> None:
    """Before each contender: collect, then freeze what this process holds (the trace, the earlier
    contenders' results), so its garbage collections during the run walk only the run's own
    objects. Unfrozen, a full collection here grew with every contender (61 ms during the first of
    a run, 111-186 ms during the later ones) and stalled the simulated pods and the load
    generator, on whichever contender was running: later contenders paid more."""
    gc.collect()
    gc.freeze()


async def start_contender(name: str, addresses: list[str], workdir: Path, venvs: Path,
                          epp_configs: dict[str, Path] | None = None,
                          baseline_src: Path | None = None) -> Running | str:
    """Start ``name`` in front of ``addresses``; a string says why it is not available. ``epp-X``
    is epp with the config file ``epp_configs[X]``; ``<epp contender>-baseline`` the same epp
    contender run from the checkout ``baseline_src`` (a change measured against its baseline);
    ``<epp contender>-one-process`` with --workers 0, ``<epp contender>-workers-2`` with 2 workers
    (Envoy cycling its ext_proc connections), and ``<epp contender>-observed`` with its responses
    read by observer filters (envoy/epp-observed.yaml, --observed-responses; one process unless
    ``-workers-2`` comes before it)."""
    env = None
    if name.endswith("-baseline") and name.startswith("epp"):
        if baseline_src is None:
            return f"no baseline checkout given for {name} (--baseline-src DIR)"
        env = checkout_env(baseline_src)
        name = name.removesuffix("-baseline")
    template = "epp-full-duplex"
    mode: tuple[str, ...] = ()
    cluster: dict[str, Any] | None = None
    if name.startswith("epp") and name not in WORKER_CONTENDERS:
        if name.endswith("-observed"):
            template, mode = "epp-observed", ("--observed-responses",)
            name = name.removesuffix("-observed")
        workers: int | None = None
        for suffix, count in (("-one-process", 0), ("-workers-2", 2)):
            if name.endswith(suffix):
                name, workers = name.removesuffix(suffix), count
        if workers is not None or mode:
            mode = ("--workers", str(workers or 0), *mode)
            cluster = CYCLED_CONNECTIONS if workers else None
    if name in ("envoy-round-robin", "envoy-least-request"):
        policy = "ROUND_ROBIN" if name == "envoy-round-robin" else "LEAST_REQUEST"
        envoy = await start_envoy("round-robin", workdir, endpoints=addresses, lb_policy=policy)
        return Running(envoy.url, [], envoy)
    if name in REPLICA_CONTENDERS:
        if REPLICA_CONTENDERS[name] and redis_binary() is None:
            return "no valkey-server or redis-server (make redis installs Debian's redis-server)"
        return await epp_replicas_behind_envoy(addresses, workdir, REPLICAS, REPLICA_CONTENDERS[name], env=env)
    if name in WORKER_CONTENDERS:
        workers = WORKER_CONTENDERS[name]
        return await epp_behind_envoy(addresses, workdir, ("--workers", str(workers)), env,
                                      epp_cluster=CYCLED_CONNECTIONS if workers else None)
    if name == "epp" or name.startswith("epp-"):
        grpc, health, metrics = free_ports(3)
        extra: tuple[str, ...] = ()
        if name != "epp":
            config = (epp_configs or {}).get(name[4:])
            if config is None:
                return f"no config file given for {name} (--epp-config {name[4:]}=PATH)"
            extra = ("--config-file", str(config))
        return await epp_behind_envoy(addresses, workdir, (*extra, *mode), env, grpc=(grpc, health, metrics),
                                      template=template, epp_cluster=cluster)
    cmd, why = await asyncio.to_thread(peer_command, name, venvs)
    if cmd is None:
        return why
    port, prom = free_ports(2)
    urls = [f"http://{a}" for a in addresses]
    args = [*cmd] if name == "vllm-router" else [*cmd, "launch"]
    args += ["--host", "127.0.0.1", "--port", str(port), "--worker-urls", *urls, "--policy", "cache_aware",
             "--prometheus-host", "127.0.0.1", "--prometheus-port", str(prom)]
    proc = spawn(args, workdir / f"{name}.log")
    base = f"http://127.0.0.1:{port}"

    async def up() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited; see {workdir / (name + '.log')}")
        async with aiohttp.ClientSession() as s, s.get(f"{base}/health") as r:
            return r.status == 200

    try:
        await wait_until(up, 60, f"{name} ready")
    except (TimeoutError, RuntimeError) as e:
        stop(proc)
        return f"{name} did not start: {e}"
    return Running(base, [proc])


def chat_body(model: str, messages: list[dict[str, str]], max_tokens: int) -> bytes:
    """A streaming chat request of fixed length that asks for usage (cached and output tokens)."""
    return orjson.dumps({"model": model, "messages": messages, "stream": True,
                         "stream_options": {"include_usage": True}, "max_tokens": max_tokens, "ignore_eos": True})


async def _turn(s: aiohttp.ClientSession, url: str, model: str, messages: list[dict[str, str]], max_tokens: int,
                kind: str, t0: float, headers: dict[str, str] | None = None) -> tuple[RequestResult, str]:
    return await stream_chat(s, url, chat_body(model, messages, max_tokens), kind, t0, headers,
                             messages[-1]["content"])


async def stream_chat(s: aiohttp.ClientSession, url: str, body: bytes, kind: str = "",
                      t0: float = 0.0, headers: dict[str, str] | None = None, key: str = ""
                      ) -> tuple[RequestResult, str]:
    """POST ``body`` to ``url``/v1/chat/completions and read the stream: TTFT (first chunk with
    text), inter-token gaps, e2e, usage; plus the generated text. Status 599 when the connection
    fails."""
    start = time.monotonic()
    res = RequestResult(kind, start - t0, 0, key=key, start=start)
    text: list[str] = []
    last = None
    try:
        async with s.post(f"{url}/v1/chat/completions", data=body,
                          headers={"content-type": "application/json", **(headers or {})}) as r:
            res.status = r.status
            if r.status != 200:
                res.dropped = r.headers.get("x-llm-d-request-dropped-reason", "")
                await r.read()
                return res, ""
            buf = b""
            async for chunk in r.content.iter_any():
                now = time.monotonic()
                if _TEXT.search(chunk):
                    if res.ttft_s is None:
                        res.ttft_s = now - start
                    elif last is not None:
                        res.itl_s.append(now - last)
                    last = now
                buf += chunk
            for line in buf.split(b"\n"):
                if not line.startswith(b"data: {"):
                    continue
                data = orjson.loads(line[6:])
                for c in data.get("choices") or ():
                    text.append((c.get("delta") or {}).get("content") or "")
                usage = data.get("usage")
                if usage:
                    res.output_tokens = usage.get("completion_tokens") or 0
                    res.cached_tokens = ((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
                    res.prompt_tokens = usage.get("prompt_tokens") or 0
            res.e2e_s = time.monotonic() - start
    except (aiohttp.ClientError, TimeoutError, ValueError):
        res.status = 599
    return res, "".join(text)


async def _session(s: aiohttp.ClientSession, url: str, model: str, sess: Session, t0: float,
                   out: list[RequestResult]) -> None:
    messages = [{"role": "system", "content": sess.system}]
    for i, q in enumerate(sess.questions):
        if i:
            await asyncio.sleep(sess.think_s)
        messages.append({"role": "user", "content": q})
        res, answer = await _turn(s, url, model, messages, sess.max_tokens, sess.kind, t0, sess.headers)
        out.append(res)
        if res.status != 200:
            # Refused (flow control's 429, a 503) or failed: the user drops that question and goes
            # on with the next one, so every run offers every request of the trace.
            messages.pop()
            continue
        messages.append({"role": "assistant", "content": answer})


Samples = list[list[float]]  # [t, outstanding on server 0, server 1, ...]


async def drive(url: str, trace: Trace, fleet: Fleet, max_seconds: float,
                on_progress: Callable[[int], None] | None = None,
                at: tuple[float, Callable[[], None]] | None = None) -> tuple[list[RequestResult], float, Samples]:
    """Replay ``trace`` against ``url``; (results, elapsed, per-server outstanding samples).
    ``at``: (seconds into the run, what to do then), e.g. kill a replica."""
    model = fleet.servers[0].params.names()[0]
    results: list[RequestResult] = []
    samples: list[list[float]] = []

    async def sample() -> None:
        while True:
            samples.append([time.monotonic() - t0, *[float(len(srv.engine.running) + len(srv.engine.waiting))
                                                      for srv in fleet.servers]])
            if on_progress is not None:
                on_progress(len(results))
            await asyncio.sleep(0.5)

    async def event(delay: float, action: Callable[[], None]) -> None:
        await asyncio.sleep(delay)
        action()

    t0 = time.monotonic()
    sampler = asyncio.create_task(sample())
    happening = asyncio.create_task(event(*at)) if at is not None else None
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                     timeout=aiohttp.ClientTimeout(total=max(60.0, max_seconds))) as s:
        tasks = []
        for sess in trace.sessions:
            delay = t0 + sess.start_s - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if time.monotonic() - t0 > max_seconds:
                break
            tasks.append(asyncio.create_task(_session(s, url, model, sess, t0, results)))
        _, pending = await asyncio.wait(tasks, timeout=max(5.0, max_seconds - (time.monotonic() - t0)) + 60)
        for t in pending:
            t.cancel()
    elapsed = time.monotonic() - t0
    background: list[asyncio.Task[None] | None] = [sampler, happening]
    for bg in background:
        if bg is not None:
            bg.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await bg
    return results, elapsed, samples


async def capacity(preset: str, servers: int, workload: str, params: WorkloadParams, seconds: float,
                   affinity: bool = True) -> float:
    """Requests/s the fleet completes with plenty of concurrency on every server: the sum of
    what each server completes on its own (a mixed fleet's fast servers count in full). Without
    ``affinity`` the servers cache no prefix: every request computes its whole prompt (the
    no-affinity capacity, which no routing choice changes)."""
    per_server = fleet_params(preset, servers)
    if not affinity:
        per_server = [p.with_overrides(enable_prefix_caching=False) for p in per_server]
    servers = len(per_server)
    fleet = Fleet(free_ports(servers), per_server)
    await fleet.start()
    model = per_server[0].names()[0]
    try:
        trace = build(workload, 20_000, 1e6, seed=99, p=params)
        flat = [(sess.system, q, sess.max_tokens) for sess in trace.sessions for q in sess.questions]
        done = 0
        idx = 0
        stop_at = time.monotonic() + seconds
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
            async def worker(server: int) -> None:
                nonlocal done, idx
                while time.monotonic() < stop_at and idx < len(flat):
                    i = idx
                    idx += 1
                    system, q, mt = flat[i]
                    url = f"http://{fleet.servers[server].address}"
                    msgs = [{"role": "system", "content": system}, {"role": "user", "content": q}]
                    res, _ = await _turn(s, url, model, msgs, mt, "capacity", 0.0)
                    if res.status == 200:
                        done += 1

            start = time.monotonic()
            await asyncio.gather(*(worker(k % servers) for k in range(servers * 24)))
            if not done:
                raise RuntimeError(f"the {preset} fleet completed no request while measuring capacity: is the "
                                   "workload's prompt longer than the preset's max_model_len?")
            return done / (time.monotonic() - start)
    finally:
        await fleet.stop()


KILL_WINDOW_S = 0.5  # after a kill, requests are grouped by when they were sent, in windows this long
KILL_SETTLED = 1.5   # a window has recovered when it has no failure and a TTFT p90 within this of before


def after_kill(results: list[RequestResult], kill_s: float, span_s: float = 6.0) -> dict[str, Any]:
    """What killing a replica ``kill_s`` into the run cost: failures among the requests sent
    before it (some were held by the killed replica) and after it (Envoy should have sent those
    to the survivor), the TTFT p90 per window after it against the p90 before it, and the
    recovery time: the end of the last window within ``span_s`` that failed a request or had a
    p90 above KILL_SETTLED times the one before."""
    before = [r.ttft_s for r in results if r.sent_s < kill_s and r.status == 200 and r.ttft_s is not None]
    p90_before = _pct(before, 90)
    windows: list[dict[str, Any]] = []
    recovered_at = 0.0
    for i in range(int(span_s / KILL_WINDOW_S)):
        lo = kill_s + i * KILL_WINDOW_S
        sent = [r for r in results if lo <= r.sent_s < lo + KILL_WINDOW_S]
        ttft = [r.ttft_s for r in sent if r.status == 200 and r.ttft_s is not None]
        failed = sum(r.status != 200 for r in sent)
        p90 = _pct(ttft, 90) if ttft else None
        windows.append({"from_s": round(lo - kill_s, 2), "sent": len(sent), "failed": failed,
                        "ttft_p90_s": round(p90, 4) if p90 is not None else None})
        if failed or (p90 is not None and p90 > KILL_SETTLED * p90_before):
            recovered_at = (i + 1) * KILL_WINDOW_S
    failed_after = [r for r in results if r.sent_s >= kill_s and r.status != 200]
    return {"at_s": kill_s, "failed_sent_before": sum(r.status != 200 for r in results if r.sent_s < kill_s),
            "failed_sent_after": len(failed_after), "sent_after": sum(r.sent_s >= kill_s for r in results),
            "ttft_p90_before_s": round(p90_before, 4), "recovery_s": recovered_at, "windows": windows}


SPLIT = ("to_pod", "pod_http", "pod", "back")  # the legs of a TTFT, in the order they happen


def ttft_split(results: list[RequestResult], fleet: Fleet) -> dict[str, Any]:
    """Where each streamed request's TTFT went, from the simulated pods' own timings (same clock,
    same process): to its pod (the client, the router, the connection), in the pod's HTTP handler
    (the body read, the tokenizer), at the engine (queue and prefill: the routing decision), and
    the first token's way back. p50 / p90 of each leg in ms, and the legs' means over the requests
    around the TTFT p90 (its 87.5th to 92.5th percentile): what makes the tail. Sets each matched
    result's ``legs_s`` and ``pod``."""
    at_pod = {key: (arrived, engine, first, srv.address) for srv in fleet.servers
              for key, arrived, engine, first in srv.timings}
    legs: list[tuple[float, tuple[float, float, float, float]]] = []
    for r in results:
        found = at_pod.get(r.key) if r.status == 200 and r.ttft_s is not None else None
        if found is None or r.ttft_s is None:
            continue
        arrived, engine, first, r.pod = found
        r.legs_s = (arrived - r.start, engine - arrived, first - engine, r.start + r.ttft_s - first)
        legs.append((r.ttft_s, r.legs_s))
    if not legs:
        return {}
    legs.sort()
    band = [x for _, x in legs[int(0.875 * len(legs)):int(0.925 * len(legs)) + 1]]
    out: dict[str, Any] = {"matched": len(legs)}
    for i, name in enumerate(SPLIT):
        values = [x[i] for _, x in legs]
        out[name] = [round(1000 * _pct(values, 50), 2), round(1000 * _pct(values, 90), 2),
                     round(1000 * sum(x[i] for x in band) / len(band), 2)]
    return out


def summarize(name: str, load: float, results: list[RequestResult], elapsed: float, fleet: Fleet,
              cpu: float) -> dict[str, Any]:
    ok = [r for r in results if r.status == 200]
    ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
    e2e = [r.e2e_s for r in ok if r.e2e_s is not None]
    itl = [x for r in ok for x in r.itl_s]
    fleet_ttft = [x for srv in fleet.servers for x in srv.engine.stats.ttft_s]
    hits = sum(srv.engine.stats.prefix_hits for srv in fleet.servers)
    queries = sum(srv.engine.stats.prefix_queries for srv in fleet.servers)
    per_server = [sum(srv.engine.stats.finished.values()) for srv in fleet.servers]
    steps = sum(srv.engine.stats.steps for srv in fleet.servers)
    late = sum(srv.engine.stats.late_s for srv in fleet.servers)
    mean = sum(per_server) / len(per_server) if per_server else 0.0
    return {
        "contender": name, "load": load, "requests": len(results), "errors": len(results) - len(ok),
        "req_per_s": round(len(ok) / elapsed, 2),
        "output_tok_per_s": round(sum(r.output_tokens for r in ok) / elapsed, 1),
        "ttft_p50_s": round(_pct(ttft, 50), 4), "ttft_p90_s": round(_pct(ttft, 90), 4),
        "ttft_p99_s": round(_pct(ttft, 99), 4),
        # The same from the fleet's side (arrival at the pod to its first token): what the routing
        # decision cost; the difference to the client's is the router's (and the client's) own delay.
        "fleet_ttft_p50_s": round(_pct(fleet_ttft, 50), 4), "fleet_ttft_p90_s": round(_pct(fleet_ttft, 90), 4),
        "itl_p50_ms": round(1000 * _pct(itl, 50), 2),
        "itl_p90_ms": round(1000 * _pct(itl, 90), 2), "e2e_p50_s": round(_pct(e2e, 50), 3),
        "e2e_p90_s": round(_pct(e2e, 90), 3), "prefix_hit_rate": round(hits / queries, 3) if queries else 0.0,
        "per_server_requests": per_server,
        "load_imbalance": round(max(per_server) / mean, 2) if mean else 0.0,
        "router_cpu_us_per_req": round(1e6 * cpu / len(results), 1) if results else None,
        # How far the simulated GPUs' steps ran behind their modelled clock: host CPU contention.
        "sim_step_late_ms": round(1000 * late / steps, 2) if steps else 0.0,
        # The share of the run's time the simulated GPUs were busy (all of them, mean), and busy
        # with steps that computed prompt tokens.
        "fleet_busy": round(sum(srv.engine.stats.busy_s for srv in fleet.servers)
                            / (elapsed * len(fleet.servers)), 3) if elapsed and fleet.servers else None,
        "fleet_prefill_busy": round(sum(srv.engine.stats.prefill_busy_s for srv in fleet.servers)
                                    / (elapsed * len(fleet.servers)), 3) if elapsed and fleet.servers else None,
        "ttft_p90_by_kind_s": {k: round(_pct([r.ttft_s for r in ok if r.kind == k and r.ttft_s is not None], 90), 4)
                               for k in sorted({r.kind for r in ok})},
        # Cold requests (the server computed > COLD_TOKENS prompt tokens) and the warm ones' tail:
        # what routing decides. The trace's own compulsory share is in the meta (first_seen_share).
        "cold_share": round(sum(r.cold for r in ok) / len(ok), 3) if ok else 0.0,
        "ttft_p90_warm_s": round(_pct([r.ttft_s for r in ok if not r.cold and r.ttft_s is not None], 90), 4),
        "ttft_all_s": sorted(round(x, 4) for x in ttft),
        "ttft_split_ms": ttft_split(results, fleet),
    }


@dataclass
class RoutingOptions:
    preset: str = "h100-llama8b"
    servers: int = 8
    loads: tuple[float, ...] = (0.9,)
    requests: int = 1200
    workload: str = "mix"
    seed: int = 1
    contenders: tuple[str, ...] = CONTENDERS
    capacity_seconds: float = 20.0
    capacity_rps: float | None = None  # given instead of measured: the same offered load across runs
    # What a load of 1.0 is: "spread" (requests spread evenly, each server caching what it sees)
    # or "no-affinity" (no server caches a prefix: the fleet's capacity whatever the routing).
    capacity_basis: str = "spread"
    max_seconds: float = 240.0
    late_limit_ms: float = 5.0  # a run whose simulated GPUs' steps were later than this on average is repeated once
    params: WorkloadParams = field(default_factory=WorkloadParams)
    epp_configs: dict[str, Path] = field(default_factory=dict)  # contender "epp-NAME" runs with config NAME
    baseline_src: Path | None = None  # contenders "epp...-baseline" run the epp of this checkout
    trace_file: Path | None = None  # replay this trace (rate from the file) instead of building one
    kill_replica_at: float | None = None  # seconds into each active-active run: SIGKILL one replica
    progress: bool = True


async def bench_routing(out: Path, opts: RoutingOptions, venvs: Path = Path(".venv-peers")) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    venvs = venvs.resolve()
    # sglang-router probes workers with HTTP/2 first; the simulator (HTTP/1.1, like vLLM's server)
    # answers 400 and aiohttp would log a traceback for each probe.
    logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL)
    own_cores = os.sched_getaffinity(0)
    fleet_cores, router_cores = split_cores()
    _place(os.getpid(), fleet_cores)
    try:
        return await _bench(out, opts, venvs, router_cores)
    finally:
        _place(os.getpid(), own_cores)


async def _bench(out: Path, opts: RoutingOptions, venvs: Path, router_cores: set[int] | None) -> dict[str, Any]:
    cap = opts.capacity_rps or await capacity(opts.preset, opts.servers, opts.workload, opts.params,
                                              opts.capacity_seconds, affinity=opts.capacity_basis == "spread")
    rows: list[dict[str, Any]] = []
    unavailable: dict[str, str] = {}
    load_series: dict[str, list[list[float]]] = {}
    first_seen: dict[str, float] = {}
    progress = _Progress(opts.progress)
    with progress:
        for load in opts.loads:
            trace = Trace.load(opts.trace_file) if opts.trace_file else build(
                opts.workload, opts.requests, cap * load, opts.seed, opts.params)
            trace.save(out / f"trace-{opts.workload}-{load}.json")
            first_seen[str(load)] = round(trace.first_seen_share(), 3)
            for name in opts.contenders:
                if name in unavailable:
                    continue
                task = progress.add(f"{name} @ {load}", trace.requests)
                best: tuple[dict[str, Any], Samples] | None = None
                runs = 0
                while runs < 2:
                    runs += 1
                    ran = await _run_one(name, load, trace, opts, out, venvs, router_cores, task, progress)
                    if isinstance(ran, str):
                        unavailable[name] = ran
                        progress.done(task, f"not available: {ran}")
                        break
                    if best is None or ran[0]["sim_step_late_ms"] < best[0]["sim_step_late_ms"]:
                        best = ran
                    # When the host slowed the simulated GPUs down, run once more and keep the
                    # run that kept closer to the modelled clock.
                    if best[0]["sim_step_late_ms"] <= opts.late_limit_ms:
                        break
                    progress.update(task, 0)
                if best is not None and name not in unavailable:
                    best[0]["runs"] = runs
                    rows.append(best[0])
                    load_series[f"{name}@{load}"] = best[1]
                    progress.done(task, f"TTFT p90 {best[0]['ttft_p90_s']} s, {best[0]['errors']} errors")
    result = {"meta": {"date": time.strftime("%Y-%m-%d %H:%M"), "preset": opts.preset,
                       "servers": len(fleet_params(opts.preset, opts.servers)),
                       "workload": opts.workload, "loads": list(opts.loads), "capacity_rps": round(cap, 2),
                       "capacity_given": opts.capacity_rps is not None, "capacity_basis": opts.capacity_basis,
                       "first_seen_share": first_seen,
                       "params": asdict(opts.params), "requests": opts.requests},
              "rows": rows, "unavailable": unavailable}
    (out / "routing.json").write_text(json.dumps(result, indent=1))
    (out / "routing.md").write_text(markdown(result))
    plots(out, result, load_series)
    return result


async def _run_one(name: str, load: float, trace: Trace, opts: RoutingOptions, out: Path, venvs: Path,
                   router_cores: set[int] | None, task: int,
                   progress: _Progress) -> tuple[dict[str, Any], Samples] | str:
    """One contender in front of a fresh fleet: its summary row and load samples, or why it is
    not available."""
    per_server = fleet_params(opts.preset, opts.servers)
    fleet = Fleet(free_ports(len(per_server)), per_server)
    await fleet.start()
    work = out / "logs" / f"{name}-{load}"
    work.mkdir(parents=True, exist_ok=True)
    try:
        running = await start_contender(name, [s.address for s in fleet.servers], work, venvs, opts.epp_configs,
                                        opts.baseline_src)
        if isinstance(running, str):
            return running
        try:
            running.isolate(router_cores)
            cpu0 = running.cpu_parts()
            kill = None
            if opts.kill_replica_at is not None and running.replicas:
                kill = (opts.kill_replica_at, running.replicas[0].kill)
            freeze_heap()  # (the pods and the load generator run in this process)
            results, elapsed, samples = await drive(running.url, trace, fleet, opts.max_seconds,
                                                    lambda n: progress.update(task, n), at=kill)
            cpu1 = running.cpu_parts()
            row = summarize(name, load, results, elapsed, fleet, sum(cpu1.values()) - sum(cpu0.values()))
            if len(cpu1) > 1 and results:
                row["router_cpu_us_per_req_by_process"] = {
                    k: round(1e6 * (v - cpu0.get(k, 0.0)) / len(results), 1) for k, v in cpu1.items()}
            if kill is not None:
                row["replica_killed"] = after_kill(results, kill[0])
            if running.store is not None:
                used = await running.store.used_memory()
                row["store_used_mb"] = round(used / 2**20, 1) if used is not None else None
            if running.metrics_url is not None:
                row["latency_ttft_error_p50"] = await latency_error_median(running.metrics_url)
            (work / "requests.json").write_text(json.dumps([asdict(r) for r in results]))
            return row, samples
        finally:
            running.stop()
    finally:
        await fleet.stop()


async def latency_error_median(url: str) -> float | None:
    """The median of epp's latency-model TTFT error over the run (its histogram, interpolated
    within the bucket); None when epp has no latency model or it learned nothing."""
    try:
        async with aiohttp.ClientSession() as s, s.get(url) as r:
            text = await r.text()
    except aiohttp.ClientError:
        return None
    buckets = [(float(m.group(1)), float(m.group(2))) for m in re.finditer(
        r'^epp_latency_prediction_ttft_error_bucket\{[^}]*le="([^"]+)"[^}]*\} (\S+)$', text, re.M)]
    return bucket_median(buckets)


def markdown(result: dict[str, Any]) -> str:
    m = result["meta"]
    lines = [f"# epp bench routing ({m['date']}): {m['preset']}, {m['servers']} servers, workload {m['workload']}, "
             f"capacity {m['capacity_rps']} req/s ({'given' if m.get('capacity_given') else 'measured'}, "
             f"{m.get('capacity_basis', 'spread')})", "",
             "| contender | load | requests | errors | req/s | output tok/s | TTFT p50 s | TTFT p90 s | TTFT p99 s "
             "| ITL p50 ms | e2e p90 s | prefix hit rate | imbalance | router CPU us/req | sim late ms/step "
             "| fleet busy | latency model error p50 |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['contender']} | {r['load']} | {r['requests']} | {r['errors']} | {r['req_per_s']} "
                     f"| {r['output_tok_per_s']} | {r['ttft_p50_s']} | {r['ttft_p90_s']} | {r['ttft_p99_s']} "
                     f"| {r['itl_p50_ms']} | {r['e2e_p90_s']} | {r['prefix_hit_rate']} | {r['load_imbalance']} "
                     f"| {r['router_cpu_us_per_req']} | {r.get('sim_step_late_ms', '-')} | {r.get('fleet_busy', '-')} "
                     f"| {_show(r.get('latency_ttft_error_p50'))} |")
    repeated = [f"{r['contender']} @ {r['load']}" for r in result["rows"] if r.get("runs", 1) > 1]
    if repeated:
        lines += ["", "Run twice because the simulated GPUs ran late (busy host); the row is the run closer to the "
                  "modelled clock: " + ", ".join(repeated) + "."]
    kinds = sorted({k for r in result["rows"] for k in r.get("ttft_p90_by_kind_s", {})})
    lines += ["", "Where the tail comes from: requests whose server computed more than "
              f"{COLD_TOKENS} prompt tokens (cold), the others' TTFT p90 (warm), and TTFT p90 by request kind. "
              "Share of requests carrying a system prompt seen for the first time (no router can find it cached), "
              "by load: " + ", ".join(f"{k}: {v}" for k, v in m.get("first_seen_share", {}).items()) + ". "
              "Fleet TTFT: from the request's arrival at its pod to the first token (what the routing decision "
              "cost, without the router's own delay).", "",
              "| contender | load | cold share | warm TTFT p90 s | fleet TTFT p50 s | fleet TTFT p90 s | "
              + " | ".join(f"{k} p90 s" for k in kinds) + " |",
              "|---|---|---|---|---|---|" + "---|" * len(kinds)]
    for r in result["rows"]:
        by_kind = r.get("ttft_p90_by_kind_s", {})
        cells = [r["contender"], r["load"], r.get("cold_share", "-"), r.get("ttft_p90_warm_s", "-"),
                 r.get("fleet_ttft_p50_s", "-"), r.get("fleet_ttft_p90_s", "-")]
        lines.append("| " + " | ".join(str(c) for c in cells + [by_kind.get(k, "-") for k in kinds]) + " |")
    split = [r for r in result["rows"] if r.get("ttft_split_ms")]
    if split:
        lines += ["", "Where each TTFT goes, from the simulated pods' own clock (ms: p50 / p90 of each leg, then its "
                  "mean over the requests around the TTFT p90, its 87.5th-92.5th percentile): to the pod (client, "
                  "router, connection), the pod's HTTP handler (body read, tokenizer), the engine (queue and "
                  "prefill: what routing decided) and the first token's way back.", "",
                  "| contender | load | matched | " + " | ".join(SPLIT) + " | around p90: "
                  + " + ".join(SPLIT) + " |", "|---|---|---|" + "---|" * (len(SPLIT) + 1)]
        for r in split:
            sp = r["ttft_split_ms"]
            lines.append(f"| {r['contender']} | {r['load']} | {sp['matched']} | "
                         + " | ".join(f"{sp[k][0]} / {sp[k][1]}" for k in SPLIT) + " | "
                         + " + ".join(str(sp[k][2]) for k in SPLIT) + " |")
    killed = [r for r in result["rows"] if "replica_killed" in r]
    if killed:
        lines += ["", "One replica SIGKILLed under load: failed requests among those sent before the kill (some held "
                  "by the killed replica) and after it, and the recovery time (the end of the last "
                  f"{KILL_WINDOW_S} s window after the kill with a failure or a TTFT p90 above {KILL_SETTLED}x the "
                  "one before).", "",
                  "| contender | load | killed at s | failed (sent before) | failed (sent after) / sent after "
                  "| TTFT p90 before s | recovery s |", "|---|---|---|---|---|---|---|"]
        for r in killed:
            k = r["replica_killed"]
            lines.append(f"| {r['contender']} | {r['load']} | {k['at_s']} | {k['failed_sent_before']} "
                         f"| {k['failed_sent_after']} / {k['sent_after']} | {k['ttft_p90_before_s']} "
                         f"| {k['recovery_s']} |")
    for name, why in result["unavailable"].items():
        lines.append(f"\n{name}: not available ({why})")
    return "\n".join(lines) + "\n"


def _show(v: Any) -> str:
    return "-" if v is None else str(v)


def plots(out: Path, result: dict[str, Any], load_series: dict[str, list[list[float]]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    if not rows:
        return
    top = max(r["load"] for r in rows)
    loads = sorted({r["load"] for r in rows})
    fig, axes = plt.subplots(1, len(loads), figsize=(5.5 * len(loads), 4.2), squeeze=False, sharey=True)
    for ax, load in zip(axes[0], loads, strict=True):
        for r in rows:
            if r["load"] == load and r["ttft_all_s"]:
                xs = r["ttft_all_s"]
                ax.plot(xs, [(i + 1) / len(xs) for i in range(len(xs))], label=r["contender"])
        ax.set_xscale("log")
        ax.set_xlabel("TTFT (s)")
        ax.set_title(f"TTFT CDF at load {load}")
    axes[0, 0].set_ylabel("fraction of requests")
    axes[0, -1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "ttft_cdf.png", dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in dict.fromkeys(r["contender"] for r in rows):
        pts = sorted((r["load"], r["output_tok_per_s"]) for r in rows if r["contender"] == name)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    ax.set_xlabel("offered load (fraction of capacity)")
    ax.set_ylabel("output tokens/s")
    ax.set_title("Throughput vs load")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "throughput_vs_load.png", dpi=110)
    plt.close(fig)

    series = {k: v for k, v in load_series.items() if k.endswith(f"@{top}") and v}
    if series:
        fig, axes = plt.subplots(len(series), 1, figsize=(7, 1.8 * len(series)), sharex=True, squeeze=False)
        for ax, (key, samples) in zip(axes[:, 0], series.items(), strict=True):
            ts = [s[0] for s in samples]
            for i in range(1, len(samples[0])):
                ax.plot(ts, [s[i] for s in samples], linewidth=0.8)
            ax.set_title(key.split("@")[0], fontsize=9)
            ax.set_ylabel("outstanding")
        axes[-1, 0].set_xlabel("time (s)")
        fig.tight_layout()
        fig.savefig(out / "server_load.png", dpi=110)
        plt.close(fig)


class _Progress:
    """A rich progress display (or nothing, for tests and CI logs)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and sys.stderr.isatty()
        self._p: Any = None

    def __enter__(self) -> _Progress:
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._p = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                               TimeElapsedColumn(), TextColumn("{task.fields[note]}"))
            self._p.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._p is not None:
            self._p.__exit__(None, None, None)

    def add(self, name: str, total: int) -> int:
        if self._p is None:
            print(f"epp bench routing: {name} ...", file=sys.stderr, flush=True)
            return 0
        task: int = self._p.add_task(name, total=total, note="")
        return task

    def update(self, task: int, completed: int) -> None:
        if self._p is not None:
            self._p.update(task, completed=completed)

    def done(self, task: int, note: str) -> None:
        if self._p is None:
            print(f"  {note}", file=sys.stderr, flush=True)
        else:
            self._p.update(task, note=note)
