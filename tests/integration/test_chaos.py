"""Processes die, stop and are told to stop, under load, with a real Envoy in front.

Every test here prints what clients saw; the README's "Failure behaviour" table quotes them."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from epp.bench.procs import children
from epp.config import load_config
from epp.server.app import PickerServer, ServeOptions
from epp.sim.fleet import Fleet
from epp.sim.profiles import profile
from epp.stack.local import (
    EnvoyProc,
    epp_command,
    free_ports,
    http_ok,
    in_process_stack,
    spawn,
    start_envoy,
    wait_until,
)

from .conftest import completion_body


async def _stream(s: aiohttp.ClientSession, url: str, prompt: str, tokens: int,
                  started: asyncio.Event | None = None) -> tuple[int, bytes]:
    body = completion_body(prompt, max_tokens=tokens, stream=True)
    async with s.post(f"{url}/v1/completions", data=body) as r:
        out = b""
        async for chunk in r.content.iter_any():
            out += chunk
            if started is not None:
                started.set()
        return r.status, out


@contextlib.asynccontextmanager
async def epp_process(workdir: Path, endpoints: list[str], *extra: str,
                      ports: list[int] | None = None) -> AsyncIterator[tuple[subprocess.Popen[bytes], list[int]]]:
    """``epp serve`` as a child process (signals reach a real process), ready when it yields."""
    grpc_port, health_port, metrics_port = ports or free_ports(3)
    proc = spawn(epp_command("serve", "--endpoints", ",".join(endpoints), "--secure-serving=false",
                             "--host", "127.0.0.1", "--grpc-port", str(grpc_port), "--grpc-health-port",
                             str(health_port), "--metrics-port", str(metrics_port), *extra),
                 workdir / f"epp-{grpc_port}-{time.monotonic_ns()}.log")
    try:
        await wait_until(lambda: _ready(health_port), 30, "epp ready")
        yield proc, [grpc_port, health_port, metrics_port]
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


async def _ready(health_port: int) -> bool:
    try:
        return await _health(health_port, "readiness") == health_pb2.HealthCheckResponse.SERVING
    except grpc.aio.AioRpcError:  # not listening yet
        return False


async def _health(port: int, service: str) -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        resp = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=1)
        return int(resp.status)


@contextlib.asynccontextmanager
async def fleet_of(n: int, step_latency: float = 0.0) -> AsyncIterator[Fleet]:
    fleet = Fleet(free_ports(n), profile("fast"))
    await fleet.start()
    for srv in fleet.servers:
        srv.engine.extra_step_latency_s = step_latency
    try:
        yield fleet
    finally:
        await fleet.stop()


async def test_sigterm_under_gateway_load_finishes_streams_and_serves_late_requests(tmp_path: Path) -> None:
    async with fleet_of(2, step_latency=0.03) as fleet:
        addrs = [s.address for s in fleet.servers]
        async with epp_process(tmp_path, addrs, "--drain-timeout", "10s") as (proc, ports):
            envoy = await start_envoy("epp-full-duplex", tmp_path, epp_port=ports[0])
            try:
                async with aiohttp.ClientSession() as s:
                    started = [asyncio.Event() for _ in range(6)]
                    streams = [asyncio.ensure_future(_stream(s, envoy.url, f"long {i}", 60, started[i]))
                               for i in range(6)]
                    await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 20)
                    t0 = time.monotonic()
                    proc.send_signal(signal.SIGTERM)
                    await asyncio.sleep(0.2)
                    readiness = await _health(ports[1], "readiness")
                    late = [asyncio.ensure_future(_stream(s, envoy.url, f"late {i}", 4)) for i in range(3)]
                    results = await asyncio.gather(*streams, *late)
                    served = time.monotonic() - t0
                rc = await asyncio.get_running_loop().run_in_executor(None, proc.wait, 20)
                exited = time.monotonic() - t0
            finally:
                envoy.stop()
    assert readiness == health_pb2.HealthCheckResponse.NOT_SERVING
    assert [status for status, _ in results] == [200] * 9
    assert all(body.rstrip().endswith(b"data: [DONE]") for _, body in results)
    assert rc == 0
    print(json.dumps({"case": "SIGTERM under gateway load", "streams": 6, "late_requests": 3,
                      "all_served_s": round(served, 2), "exited_s": round(exited, 2)}))


async def test_a_pod_killed_mid_stream_cuts_only_its_stream() -> None:
    timeout = aiohttp.ClientTimeout(total=10)
    async with in_process_stack(servers=2, decision_headers=True) as stack, aiohttp.ClientSession(timeout=timeout) as s:
        assert stack.picker is not None
        for srv in stack.fleet.servers:
            srv.engine.extra_step_latency_s = 0.03
        resp = await s.post(f"{stack.url}/v1/completions", data=completion_body("doomed", max_tokens=200,
                                                                                  stream=True))
        victim = resp.headers["x-epp-endpoint"]
        await resp.content.readany()
        await asyncio.wait_for(stack.server(victim).crash(None), 10)
        with contextlib.suppress(aiohttp.ClientError):
            await asyncio.wait_for(resp.read(), 10)  # cut: an error or a truncated body, never a hang
        resp.close()
        picker = stack.picker

        async def victim_failing() -> bool:
            st = picker.store.get(victim)
            return st is not None and st.error is not None

        await wait_until(victim_failing, 5, "the dead pod's scrape failing")
        await wait_until(lambda: _no_inflight(picker), 5, "in-flight back to 0")
        statuses, where = [], []
        for i in range(10):
            async with s.post(f"{stack.url}/v1/completions", data=completion_body(f"after {i}")) as r:
                await r.read()
                statuses.append(r.status)
                where.append(r.headers.get("x-epp-endpoint"))

    assert statuses == [200] * 10 and victim not in where


async def _no_inflight(picker: PickerServer) -> bool:
    return sum(picker.store.inflight.values()) == 0


async def test_a_stopped_pod_stops_getting_traffic_and_comes_back(tmp_path: Path) -> None:
    sim_ports = free_ports(2)
    sims = [spawn(epp_command("sim", "--ports", str(p)), tmp_path / f"sim-{p}.log") for p in sim_ports]
    addrs = [f"127.0.0.1:{p}" for p in sim_ports]
    own = free_ports(3)
    opts = ServeOptions(config=load_config(None), endpoints=tuple(addrs), host="127.0.0.1", grpc_port=own[0],
                        grpc_health_port=own[1], metrics_port=own[2], secure_serving=False,
                        scrape_timeout=0.3, metrics_staleness_threshold=1.0, decision_headers=True)
    picker = PickerServer(opts)
    envoy: EnvoyProc | None = None
    try:
        for a in addrs:
            await wait_until(lambda a=a: http_ok(f"http://{a}/health"), 30, f"sim {a}")
        await picker.start()
        await wait_until(lambda: _all_fresh(picker), 10, "both pods fresh")
        envoy = await start_envoy("epp-full-duplex", tmp_path, epp_port=picker.bound_ports["grpc"])
        stopped = addrs[0]
        sims[0].send_signal(signal.SIGSTOP)
        t0 = time.monotonic()

        async def stale() -> bool:
            return not _fresh(picker, stopped)

        await wait_until(stale, 10, "the stopped pod dropped from routing")
        dropped = time.monotonic() - t0
        timeout = aiohttp.ClientTimeout(total=5)
        async with aiohttp.ClientSession(timeout=timeout) as s:
            while_stopped = [await _served(s, envoy.url, f"while stopped {i}") for i in range(20)]
            sims[0].send_signal(signal.SIGCONT)
            await wait_until(lambda: _all_fresh(picker), 10, "the pod fresh again")
            after = {await _served(s, envoy.url, f"after {i} " + "x" * (i * 7)) for i in range(30)}
    finally:
        sims[0].send_signal(signal.SIGCONT)
        if envoy is not None:
            envoy.stop()
        await picker.stop(0.2)
        for p in sims:
            p.terminate()
            p.wait(10)
    assert all(w == addrs[1] for w in while_stopped)
    assert after == set(addrs)
    print(json.dumps({"case": "SIGSTOP a pod", "dropped_from_routing_s": round(dropped, 2)}))


def _fresh(picker: PickerServer, address: str) -> bool:
    snap = picker.store.snapshot()
    return any(e.address == address and e.fresh(snap.now, snap.staleness) for e in snap.endpoints)


async def _all_fresh(picker: PickerServer) -> bool:
    return all(_fresh(picker, a) for a in picker.store.addresses())


async def _served(s: aiohttp.ClientSession, url: str, prompt: str) -> str:
    async with s.post(f"{url}/v1/completions", data=completion_body(prompt)) as r:
        await r.read()
        assert r.status == 200
        return r.headers["x-epp-endpoint"]


async def test_kill_9_and_restart_measures_the_error_window(tmp_path: Path) -> None:
    async with fleet_of(2) as fleet:
        addrs = [s.address for s in fleet.servers]
        ports = free_ports(3)
        envoy: EnvoyProc | None = None
        log: list[tuple[float, int]] = []
        stop = asyncio.Event()

        async def client(s: aiohttp.ClientSession, url: str) -> None:
            i = 0
            while not stop.is_set():
                i += 1
                try:
                    async with s.post(f"{url}/v1/completions", data=completion_body(f"c{i}")) as r:
                        await r.read()
                        log.append((time.monotonic(), r.status))
                except (TimeoutError, aiohttp.ClientError):
                    log.append((time.monotonic(), -1))
                await asyncio.sleep(0.02)

        try:
            async with epp_process(tmp_path, addrs, ports=ports) as (proc, _):
                envoy = await start_envoy("epp-full-duplex", tmp_path, epp_port=ports[0])
                session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
                task = asyncio.ensure_future(client(session, envoy.url))
                await asyncio.sleep(0.5)
                killed = time.monotonic()
                proc.kill()
                proc.wait(10)
            async with epp_process(tmp_path, addrs, ports=ports):
                restarted = time.monotonic()
                await asyncio.sleep(1.0)
                stop.set()
                await task
                await session.close()
        finally:
            if envoy is not None:
                envoy.stop()
    before = [st for t, st in log if t < killed]
    errors = [t for t, st in log if st != 200]
    after = [st for t, st in log if t > restarted + 0.5]
    assert before and all(st == 200 for st in before)
    assert after and all(st == 200 for st in after)  # clients recover once the new process is ready
    window = (max(errors) - killed) if errors else 0.0
    report: dict[str, Any] = {"case": "kill -9 epp, restart at once", "errors": len(errors),
                              "error_window_s": round(window, 2), "restart_to_ready_s": round(restarted - killed, 2),
                              "error_statuses": sorted({st for _, st in log if st != 200})}
    print(json.dumps(report))


@pytest.mark.parametrize(("template", "flags", "survive"), [
    ("epp-full-duplex", (), False),
    ("epp-observed", ("--observed-responses", "--workers", "0"), True),
    ("epp-observed", ("--observed-responses", "--workers", "2"), True)])
async def test_kill_9_mid_stream_cuts_full_duplex_streams_and_spares_observed_ones(
        tmp_path: Path, template: str, flags: tuple[str, ...], survive: bool) -> None:
    async with fleet_of(2, step_latency=0.03) as fleet:
        addrs = [s.address for s in fleet.servers]
        async with epp_process(tmp_path, addrs, *flags) as (proc, ports):
            envoy = await start_envoy(template, tmp_path, epp_port=ports[0])
            try:
                async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as s:
                    started = [asyncio.Event() for _ in range(4)]
                    streams = [asyncio.ensure_future(_stream(s, envoy.url, f"long {i}", 40, started[i]))
                               for i in range(4)]
                    await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 20)
                    proc.kill()  # ~1.2 s of each stream still to come
                    results = await asyncio.gather(*streams, return_exceptions=True)
            finally:
                envoy.stop()
    whole = [not isinstance(r, BaseException) and r[0] == 200 and r[1].rstrip().endswith(b"data: [DONE]")
             for r in results]
    # Full duplex: every chunk waits for epp's answer, so its death cuts them (FailClose). Observed:
    # the pick filter is done with the stream, and the observers fail open.
    assert whole == [survive] * 4, results


def _alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


async def test_the_workers_leave_with_a_killed_epp_and_the_next_one_serves(tmp_path: Path) -> None:
    async with fleet_of(2) as fleet:
        addrs = [s.address for s in fleet.servers]
        ports = free_ports(3)
        async with epp_process(tmp_path, addrs, "--workers", "2", ports=ports) as (proc, _):
            workers = children(proc.pid)
            assert len(workers) == 2
            proc.kill()
            proc.wait(10)

            async def gone() -> bool:
                return not any(_alive(pid) for pid in workers)

            await wait_until(gone, 5, "the workers of the killed epp gone")
        async with epp_process(tmp_path, addrs, "--workers", "2", ports=ports):
            envoy = await start_envoy("epp-full-duplex", tmp_path, epp_port=ports[0])
            try:
                async with aiohttp.ClientSession() as s:
                    for i in range(10):
                        async with s.post(f"{envoy.url}/v1/completions", data=completion_body(f"n{i}")) as r:
                            assert r.status == 200, await r.text()
            finally:
                envoy.stop()
            log = max(tmp_path.glob(f"epp-{ports[0]}-*.log"), key=lambda p: p.stat().st_mtime)  # noqa: ASYNC240

            async def settled() -> bool:  # the serving process and each worker, once serving
                return log.read_text().count("frozen out of the garbage collector") == 3

            await wait_until(settled, 10, "the serving process and its two workers settled")
