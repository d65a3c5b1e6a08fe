"""``epp gateway`` through its real Envoy, against the simulated fleet: every row of the seeds'
error table (401, 429, 502, 503, 504, 400, 200 JSON, 200 SSE), /healthz, /v1/models, retries over
the picker's fallbacks (a pod returning 503, killed, hanging), no retry once streaming started,
the timeout chain on a shortened scale, per-key concurrency, usage metering, TLS and HTTP/2."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import os
import ssl
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import orjson
import pytest

from epp.server.tls import self_signed
from epp.sim.profiles import profile
from epp.stack.local import GatewayStack, gateway_stack, wait_until

from .conftest import chat_body, post

KEY = "sk-gateway-test-0123456789"
SLOW_KEY = "sk-gateway-slow-0123456789"


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def keys_file(path: Path, *entries: str) -> str:
    path.write_text("keys:\n" + "".join(f"- {e}\n" for e in entries))
    return str(path)


def auth(key: str = KEY) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def usage_lines(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(x) for x in path.read_bytes().splitlines()] if path.exists() else []


async def admin(stack: GatewayStack, address: str, **cmd: Any) -> None:
    await stack.server(address).apply_admin(cmd)


async def sse(session: aiohttp.ClientSession, url: str, body: bytes, **kw: Any) -> tuple[int, bytes]:
    async with session.post(url, data=body, **kw) as r:
        return r.status, await r.read()


def served_counts(stack: GatewayStack) -> dict[str, int]:
    return {s.address: sum(1 for e in s.request_log if e["path"] == "/v1/chat/completions")
            for s in stack.fleet.servers}


def error_of(body: bytes) -> dict[str, Any]:
    err: dict[str, Any] = orjson.loads(body)["error"]
    return err


async def test_error_table_rows(tmp_path: Path) -> None:
    """401, 400, 200 JSON, 200 SSE, 429 (epp), then 503, 504 and 502 from the model servers' side."""
    keys = keys_file(tmp_path / "keys.yaml", f"{{id: k1, sha256: {sha(KEY)}, tenant: team-a}}",
                     f"{{id: k2, sha256: {sha(SLOW_KEY)}, tenant: trial, limits: {{requestsPerMinute: 2}}}}")
    usage = tmp_path / "usage.jsonl"
    cfg = f"apiKeys: {keys}\nmetering: {{log: {usage}}}\n"
    async with gateway_stack(cfg, servers=2, scale=0.005) as stack, aiohttp.ClientSession() as s:
        url = f"{stack.url}/v1/chat/completions"
        await wait_until(lambda: _healthz(s, stack.url, 200), 10, "/healthz 200")  # no key needed
        status, _, body = await post(s, url, chat_body("hi"))
        assert status == 401 and error_of(body)["type"] == "AuthenticationError"
        status, _, body = await post(s, url, b'{"model": "sim-model", "messages": [', headers=auth())
        assert status == 400 and error_of(body)["type"] == "BadRequestError"
        assert sum(served_counts(stack).values()) == 0  # neither reached a model server
        status, headers, body = await post(s, url, chat_body("hello", max_tokens=4), headers=auth())
        assert status == 200 and headers["content-type"].startswith("application/json")
        assert "x-gateway-destination-endpoint-served" not in headers  # the picker's note, removed
        assert orjson.loads(body)["usage"]["completion_tokens"] == 4
        status, stream = await sse(s, url, chat_body("stream me", max_tokens=5, stream=True), headers=auth())
        assert status == 200 and stream.rstrip().endswith(b"data: [DONE]")
        assert b'"usage"' not in stream.replace(b'"usage":null', b"")  # the client did not ask for usage
        for _ in range(2):
            status, _, _ = await post(s, url, chat_body("trial"), headers=auth(SLOW_KEY))
            assert status == 200
        status, headers, body = await post(s, url, chat_body("trial"), headers=auth(SLOW_KEY))
        assert status == 429 and error_of(body)["type"] == "RateLimitError"
        assert int(headers["retry-after"]) >= 1 and headers["x-ratelimit-limit-requests"] == "2"
        # 503: every model server answers 503, on every attempt; the client gets the last one.
        for a in (x.address for x in stack.fleet.servers):
            await admin(stack, a, drain=True)
        status, _, body = await post(s, url, chat_body("drained"), headers=auth())
        assert status == 503, body
        # 504: every model server stays silent longer than upstreamIdle (1.5 s here).
        for a in (x.address for x in stack.fleet.servers):
            await admin(stack, a, drain=False, extra_latency_ms=2500)
        status, _, body = await post(s, url, chat_body("silent"), headers=auth())
        assert status == 504 and error_of(body)["type"] == "GatewayTimeoutError", body
        # 502: the model servers are gone (killed) before the picker noticed.
        for a in (x.address for x in stack.fleet.servers):
            await admin(stack, a, extra_latency_ms=0)
            await stack.server(a).crash(None)
        status, _, body = await post(s, url, chat_body("gone"), headers=auth())
        assert status == 502 and error_of(body)["type"] == "BadGatewayError", body
        metering = stack.picker.director.metering
        assert metering is not None
        metering.flush()  # (lines are written within 100 ms; now, for the test)
        lines = usage_lines(usage)
        by_status: dict[int, int] = {}
        for line in lines:
            by_status[line["status"]] = by_status.get(line["status"], 0) + 1
        assert {401, 400, 200, 429, 503, 504, 502} <= set(by_status), by_status
        streamed = next(x for x in lines if x["stream"])
        assert streamed["completion_tokens"] == 5 and streamed["key_id"] == "k1" and streamed["tenant"] == "team-a"
        assert all("sk-" not in orjson.dumps(x).decode() for x in lines)  # never the key itself


async def _healthz(s: aiohttp.ClientSession, base: str, want: int) -> bool:
    async with s.get(f"{base}/healthz") as r:
        return r.status == want


async def test_healthz_follows_the_picker_and_is_not_metered(tmp_path: Path) -> None:
    usage = tmp_path / "usage.jsonl"
    async with gateway_stack(f"metering: {{log: {usage}}}\n", servers=1) as stack, aiohttp.ClientSession() as s:
        await wait_until(lambda: _healthz(s, stack.url, 200), 10, "/healthz 200")
        stack.picker.readiness.drain()  # the picker reports NOT_SERVING
        await wait_until(lambda: _healthz(s, stack.url, 503), 10, "/healthz 503")
        assert usage_lines(usage) == []


@pytest.mark.parametrize("failure", [503, 429])
async def test_retries_land_on_the_fallbacks_and_the_picker_learns(failure: int) -> None:
    """A pod answering 503 (or 429): every request still gets 200 from another pod (Envoy retries
    the picker's next endpoint); after 5 failures in a row the picker stops choosing it."""
    cfg = "circuitBreaker: {consecutiveFailures: 5, ejectionTime: 30s}\n"
    async with gateway_stack(cfg, servers=3) as stack, aiohttp.ClientSession() as s:
        url = f"{stack.url}/v1/chat/completions"
        bad = stack.fleet.servers[0].address
        await admin(stack, bad, fail_status=failure)
        ejections = stack.picker.director.ejections
        assert ejections is not None
        # Until the picker has seen 5 failures of it in a row (how many requests that takes depends
        # on how often it comes first in the picker's list, ties being drawn at random): bounded.
        for i in range(200):
            status, headers, body = await post(s, url, chat_body(f"request {i}"))
            assert status == 200, body
            assert headers["x-sim-server"] != bad
            if i >= 29 and bad in ejections.excluded():
                break
        assert bad in ejections.excluded()
        # At most 5 attempts reach it (Envoy's outlier detection may eject it first: then the
        # picker still counts the attempts Envoy skipped as failures, from the served endpoint).
        assert 1 <= served_counts(stack)[bad] <= 5
        before = served_counts(stack)[bad]
        for i in range(10):
            status, _, _ = await post(s, url, chat_body(f"after {i}"))
            assert status == 200
        assert served_counts(stack)[bad] == before


async def test_a_killed_pod_is_retried_elsewhere() -> None:
    async with gateway_stack("", servers=3) as stack, aiohttp.ClientSession() as s:
        url = f"{stack.url}/v1/chat/completions"
        victim = stack.fleet.servers[1]
        await victim.crash(None)  # the picker still believes in it for up to its staleness (2 s)
        results = await asyncio.gather(*(post(s, url, chat_body(f"k{i}")) for i in range(20)))
        assert [r[0] for r in results] == [200] * 20
        assert all(r[1]["x-sim-server"] != victim.address for r in results)


async def test_no_retry_once_the_stream_started() -> None:
    slow = profile("fast")
    async with gateway_stack("", servers=2, params=slow) as stack, aiohttp.ClientSession() as s:
        url = f"{stack.url}/v1/chat/completions"
        for srv in stack.fleet.servers:
            await srv.apply_admin({"step_latency_ms": 50})
        async with s.post(url, data=chat_body("long one", max_tokens=200, stream=True)) as r:
            assert r.status == 200
            served = r.headers["x-sim-server"]
            first = await r.content.readline()
            assert first.startswith(b"data:")
            await stack.server(served).crash(None)
            rest = b""
            with contextlib.suppress(aiohttp.ClientPayloadError):  # the cut, as the client sees it
                rest = await r.content.read()
            assert b"[DONE]" not in rest
        other = next(x for x in stack.fleet.servers if x.address != served)
        assert served_counts(stack)[other.address] == 0  # never re-sent once bytes went out


async def test_timeout_chain_on_a_shortened_scale() -> None:
    """At scale 0.01 (upstreamIdle 3 s): a 3.6 s stream (6 minutes at full scale) with a token
    every 100 ms is never cut; a pod silent for 4 s is given up on and the retry succeeds
    elsewhere; with one attempt the client gets 504."""
    async with gateway_stack("", servers=2, scale=0.01) as stack, aiohttp.ClientSession() as s:
        url = f"{stack.url}/v1/chat/completions"
        for srv in stack.fleet.servers:
            await srv.apply_admin({"step_latency_ms": 100})
        status, stream = await sse(s, url, chat_body("six minutes", max_tokens=36, stream=True))
        assert status == 200 and stream.count(b"data: {") >= 36 and stream.rstrip().endswith(b"[DONE]")
        for srv in stack.fleet.servers:
            await srv.apply_admin({"step_latency_ms": 0})
        hung = stack.fleet.servers[0]
        await hung.apply_admin({"extra_latency_ms": 4000})
        for i in range(4):
            status, headers, body = await post(s, url, chat_body(f"maybe hung {i}"))
            assert status == 200 and headers["x-sim-server"] != hung.address, body
    async with gateway_stack("retries: {attempts: 1}\n", servers=1, scale=0.01) as stack, \
            aiohttp.ClientSession() as s:
        await stack.fleet.servers[0].apply_admin({"extra_latency_ms": 4000})
        status, _, body = await post(s, f"{stack.url}/v1/chat/completions", chat_body("hung"))
        assert status == 504 and error_of(body)["code"] == 504


async def test_concurrency_limit_and_the_key_never_reaches_a_server(tmp_path: Path) -> None:
    keys = keys_file(tmp_path / "keys.yaml",
                     f"{{id: one, sha256: {sha(KEY)}, tenant: t, limits: {{concurrency: 1}}}}")
    async with gateway_stack(f"apiKeys: {keys}\n", servers=2) as stack, aiohttp.ClientSession() as s:
        url = f"{stack.url}/v1/chat/completions"
        for srv in stack.fleet.servers:
            await srv.apply_admin({"step_latency_ms": 20})
        async with s.post(url, data=chat_body("slow", max_tokens=40, stream=True), headers=auth()) as r:
            assert r.status == 200
            await r.content.readline()
            status, headers, body = await post(s, url, chat_body("second"), headers=auth())
            assert status == 429 and headers["x-ratelimit-limit-concurrency"] == "1", body
            await r.read()
        status, _, _ = await post(s, url, chat_body("third"), headers={"x-api-key": KEY})
        assert status == 200
        logged = [e["headers"] for srv in stack.fleet.servers for e in srv.request_log
                  if e["path"] == "/v1/chat/completions"]
        assert len(logged) == 2 and all("authorization" not in h and "x-api-key" not in h for h in logged)


async def test_the_servers_own_key_replaces_the_clients(tmp_path: Path) -> None:
    """servers.apiKeyFile: model servers started with their own key (vllm serve --api-key) get it
    on every request; the client's key never reaches them, in either header."""
    keys = keys_file(tmp_path / "keys.yaml", f"{{id: k, sha256: {sha(KEY)}, tenant: t}}")
    (tmp_path / "vllm-key").write_text("upstream-secret-1\n")
    cfg = f"apiKeys: {keys}\nservers: {{apiKeyFile: {tmp_path / 'vllm-key'}}}\n"
    async with gateway_stack(cfg, servers=1) as stack, aiohttp.ClientSession() as s:
        url = f"{stack.url}/v1/chat/completions"
        for headers in (auth(), {"x-api-key": KEY}):
            status, _, _ = await post(s, url, chat_body("hi"), headers=headers)
            assert status == 200
        logged = [e["headers"] for e in stack.fleet.servers[0].request_log if e["path"] == "/v1/chat/completions"]
        assert [h.get("authorization") for h in logged] == ["Bearer upstream-secret-1"] * 2
        assert all("x-api-key" not in h for h in logged)


async def test_models_merged_across_pods(tmp_path: Path) -> None:
    keys = keys_file(tmp_path / "keys.yaml", f"{{id: k, sha256: {sha(KEY)}, tenant: t}}")
    async with gateway_stack(f"apiKeys: {keys}\n", servers=2) as stack, aiohttp.ClientSession() as s:
        for srv, adapter in zip(stack.fleet.servers, ("adapter-a", "adapter-b"), strict=True):
            srv.params = dataclasses.replace(srv.params, lora_adapters=(adapter,))  # each pod its own adapter
        catalog = stack.picker.models
        assert catalog is not None
        await catalog.poll_once()
        async with s.get(f"{stack.url}/v1/models") as r:
            assert r.status == 401
        async with s.get(f"{stack.url}/v1/models", headers=auth()) as r:
            assert r.status == 200 and "x-sim-server" not in r.headers  # the gateway answered, no model server
            listing = await r.json()
        ids = [m["id"] for m in listing["data"]]
        assert ids == ["adapter-a", "adapter-b", "sim-model"]
        assert next(m for m in listing["data"] if m["id"] == "adapter-b")["parent"] == "sim-model"
        async with s.get(f"{stack.url}/v1/models/adapter-a", headers=auth()) as r:
            assert r.status == 200 and (await r.json())["id"] == "adapter-a"
        async with s.get(f"{stack.url}/v1/models/nope", headers=auth()) as r:
            assert r.status == 404 and (await r.json())["error"]["type"] == "NotFoundError"


async def test_tls_and_http2(tmp_path: Path) -> None:
    key, cert = self_signed(("localhost",))
    (tmp_path / "tls.crt").write_bytes(cert)
    (tmp_path / "tls.key").write_bytes(key)
    cfg = f"listeners: [{{tls: {{certFile: {tmp_path / 'tls.crt'}, keyFile: {tmp_path / 'tls.key'}}}}}]\n"
    async with gateway_stack(cfg, servers=1) as stack:
        ctx = ssl.create_default_context(cadata=cert.decode())
        async with httpx.AsyncClient(http2=True, verify=ctx) as c:
            r = await c.post(stack.url.replace("127.0.0.1", "localhost") + "/v1/chat/completions",
                             content=chat_body("over h2"))
            assert r.status_code == 200 and r.http_version == "HTTP/2"
        async with httpx.AsyncClient(http2=False, verify=ctx) as c:
            r = await c.post(stack.url.replace("127.0.0.1", "localhost") + "/v1/chat/completions",
                             content=chat_body("over h1"))
            assert r.status_code == 200 and r.http_version == "HTTP/1.1"
    async with gateway_stack("", servers=1) as stack, httpx.AsyncClient(http1=False, http2=True) as c:
        r = await c.post(stack.url + "/v1/chat/completions", content=chat_body("h2c"))  # prior knowledge
        assert r.status_code == 200 and r.http_version == "HTTP/2"


async def test_discovered_servers_follow_the_endpoints_file(tmp_path: Path) -> None:
    """servers.endpointsFile: the picker writes what it discovers to the file Envoy's EDS reads,
    so a model server added to the file takes traffic through the gateway."""
    endpoints = tmp_path / "endpoints.yaml"
    async with gateway_stack(f"servers: {{endpointsFile: {endpoints}}}\n", servers=2,
                             workdir=tmp_path / "gw", before=lambda fleet: endpoints.write_text(
                                 f"- {fleet.servers[0].address}\n")) as stack, aiohttp.ClientSession() as s:
        url = f"{stack.url}/v1/chat/completions"
        first, second = (x.address for x in stack.fleet.servers)
        for i in range(4):
            status, headers, _ = await post(s, url, chat_body(f"one {i}"))
            assert status == 200 and headers["x-sim-server"] == first
        endpoints.write_text(f"- {first}\n- {second}\n")

        async def second_serves() -> bool:
            await admin(stack, first, drain=True)  # only the new one can answer
            status, headers, _ = await post(s, url, chat_body("two"))
            return status == 200 and headers["x-sim-server"] == second

        await wait_until(second_serves, 10, "the added server to take traffic")


async def test_a_renewed_certificate_is_served_without_a_restart(tmp_path: Path) -> None:
    """TLS listeners read their certificate through filesystem SDS: replacing the files (as
    cert-manager or a Secret mount does, by moving them into place) changes what clients get."""
    certs = tmp_path / "certs"
    certs.mkdir()

    def install(pair: tuple[bytes, bytes]) -> None:
        for name, data in (("tls.key", pair[0]), ("tls.crt", pair[1])):
            (tmp_path / name).write_bytes(data)
            os.replace(tmp_path / name, certs / name)

    first, second = self_signed(("localhost",)), self_signed(("localhost",))
    install(first)
    cfg = f"listeners: [{{tls: {{certFile: {certs / 'tls.crt'}, keyFile: {certs / 'tls.key'}}}}}]\n"
    async with gateway_stack(cfg, servers=1) as stack:
        port = stack.cfg.listeners[0].port

        def served() -> str:
            return ssl.get_server_certificate(("127.0.0.1", port))

        def same(pem: str, cert: bytes) -> bool:
            return ssl.PEM_cert_to_DER_cert(pem) == ssl.PEM_cert_to_DER_cert(cert.decode())

        assert same(await asyncio.to_thread(served), first[1])
        install(second)

        async def renewed() -> bool:
            return same(await asyncio.to_thread(served), second[1])

        await wait_until(renewed, 15, "the renewed certificate")


async def test_the_command_restarts_envoy_and_stops_cleanly(tmp_path: Path) -> None:
    """`epp gateway` as operators run it: Envoy killed -> restarted (the gateway answers again);
    SIGTERM -> the picker drains, Envoy is stopped, the command exits 0."""
    import signal
    import subprocess

    from epp.sim.fleet import Fleet
    from epp.stack.local import free_ports

    listen, admin, grpc, health, metrics, pod = free_ports(6)
    fleet = Fleet([pod], profile("fast"))
    await fleet.start()
    cfg = tmp_path / "gw.yaml"
    cfg.write_text(f"listeners: [{{port: {listen}, address: 127.0.0.1}}]\nservers: {{static: [127.0.0.1:{pod}]}}\n"
                   f"envoy: {{adminPort: {admin}}}\npicker: {{grpcPort: {grpc}, healthPort: {health}, "
                   f"metricsPort: {metrics}}}\nmetering: {{log: false}}\n")
    proc = _spawn_gateway(cfg, tmp_path / "work")
    try:
        async with aiohttp.ClientSession() as s:
            base = f"http://127.0.0.1:{listen}"
            await wait_until(lambda: _healthz(s, base, 200), 30, "the gateway")
            envoy_pid = int((await asyncio.to_thread(subprocess.check_output, ["pgrep", "-P", str(proc.pid), "envoy"])
                             ).split()[0])
            os.kill(envoy_pid, signal.SIGKILL)
            await asyncio.sleep(0.5)
            await wait_until(lambda: _healthz(s, base, 200), 30, "the gateway after Envoy was killed")
            status, _, _ = await post(s, f"{base}/v1/chat/completions", chat_body("after the restart"))
            assert status == 200
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.to_thread(proc.communicate, timeout=30)
        assert proc.returncode == 0, err
        assert b"restarting it" in err and b"Traceback" not in err
        gone = await asyncio.to_thread(subprocess.run, ["pgrep", "-P", str(proc.pid)], capture_output=True)
        assert gone.returncode == 1  # no child left
    finally:
        if proc.poll() is None:
            proc.kill()
        await fleet.stop()


def _spawn_gateway(cfg: Path, workdir: Path) -> Any:
    import subprocess
    import sys

    return subprocess.Popen([sys.executable, "-m", "epp.cli", "gateway", "-c", str(cfg), "--workdir", str(workdir)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
