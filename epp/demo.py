"""`epp demo` (what `make demo` runs): a 4-server simulated fleet + epp + a real Envoy on
localhost, a short burst of mixed traffic, a table of where each request went and why; then
`epp gateway` in front of a 3-server fleet: a request without a key (401), with one (200), a burst
over a key's limit (429), a pod killed mid-run (the retries land on the fallbacks), and the usage
lines. Both stacks stay up until Ctrl-C."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import orjson

from epp.sim.profiles import profile
from epp.stack.local import GatewayStack, Stack, gateway_stack, in_process_stack

SUPPORT = "You are ACME's support assistant. Policy: " + "answer precisely, cite the manual, be kind. " * 30
CODING = "You are a senior Python reviewer. Rules: " + "prefer clarity, type everything, test it. " * 30


@dataclass
class Sent:
    label: str
    status: int
    endpoint: str
    reason: str
    seconds: float
    cached: int


async def _one(s: aiohttp.ClientSession, stack: Stack, label: str, path: str, body: dict[str, object] | None) -> Sent:
    t0 = time.perf_counter()
    if body is None:
        async with s.get(stack.url + path) as r:
            await r.read()
            status, headers, payload = r.status, r.headers, b""
    else:
        async with s.post(stack.url + path, data=orjson.dumps(body)) as r:
            payload = await r.read()
            status, headers = r.status, r.headers
    cached = 0
    if payload.startswith(b"{"):
        usage = orjson.loads(payload).get("usage") or {}
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    elif b'"usage"' in payload:
        for line in payload.split(b"\n"):
            if b'"usage"' in line:
                cached = orjson.loads(line[6:])["usage"]["prompt_tokens_details"]["cached_tokens"]
    return Sent(label, status, headers.get("x-epp-endpoint", "-"), headers.get("x-epp-reason", ""),
                time.perf_counter() - t0, cached)


def chat(system: str, question: str, stream: bool = False) -> dict[str, object]:
    body: dict[str, object] = {"model": "meta-llama/Llama-3.1-8B-Instruct", "max_tokens": 24, "ignore_eos": True,
                               "messages": [{"role": "system", "content": system},
                                            {"role": "user", "content": question}]}
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return body


async def traffic(stack: Stack) -> list[Sent]:
    busy = stack.fleet.servers[3]
    await busy.apply_admin({"pin": {"num_requests_waiting": 40}})  # one pod looks overloaded
    await asyncio.sleep(0.2)
    out: list[Sent] = []
    async with aiohttp.ClientSession() as s:
        out.append(await _one(s, stack, "support #1 (new prefix)", "/v1/chat/completions", chat(SUPPORT, "Refund?")))
        out.append(await _one(s, stack, "coding #1 (new prefix)", "/v1/chat/completions", chat(CODING, "Review a()")))
        for i in range(2, 5):
            out.append(await _one(s, stack, f"support #{i} (shared prefix)", "/v1/chat/completions",
                                  chat(SUPPORT, f"Question {i}?")))
            out.append(await _one(s, stack, f"coding #{i} (shared prefix)", "/v1/chat/completions",
                                  chat(CODING, f"Review f{i}()")))
        out.append(await _one(s, stack, "support (streaming)", "/v1/chat/completions",
                              chat(SUPPORT, "Stream it", stream=True)))
        burst = await asyncio.gather(*(
            _one(s, stack, f"burst #{i} (unique)", "/v1/completions",
                 {"model": "meta-llama/Llama-3.1-8B-Instruct", "prompt": f"unique prompt {i} " * 40,
                  "max_tokens": 64, "ignore_eos": True}) for i in range(6)))
        out.extend(burst)
        out.append(await _one(s, stack, "GET /v1/models (no body)", "/v1/models", None))
    return out


def table(rows: list[Sent], stack: Stack) -> str:
    names = {srv.address: f"pod-{i + 1}" for i, srv in enumerate(stack.fleet.servers)}
    lines = [f"{'request':32} {'status':>6} {'pod':>6} {'cached':>7} {'secs':>6}  why"]
    for r in rows:
        pod = names.get(r.endpoint.split(",")[0], r.endpoint)
        lines.append(f"{r.label:32} {r.status:>6} {pod:>6} {r.cached:>7} {r.seconds:>6.2f}  {r.reason}")
    return "\n".join(lines)


DEMO_KEY = "sk-demo-team-a-0123456789"
TRIAL_KEY = "sk-demo-trial-0123456789"


def _keys(path: Path) -> Path:
    sha = [hashlib.sha256(k.encode()).hexdigest() for k in (DEMO_KEY, TRIAL_KEY)]
    path.write_text(f"keys:\n- {{id: team-a-1, sha256: {sha[0]}, tenant: team-a}}\n"
                    f"- {{id: trial-1, sha256: {sha[1]}, tenant: trial, limits: {{requestsPerMinute: 3}}}}\n")
    return path


async def _status(s: aiohttp.ClientSession, url: str, key: str | None, text: str) -> tuple[int, str]:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    body = chat("You are terse.", text)
    async with s.post(f"{url}/v1/chat/completions", json=body, headers=headers) as r:
        await r.read()
        return r.status, r.headers.get("x-sim-server", "-")


async def gateway_demo(stack: GatewayStack, usage: Path) -> bool:
    """The front door, step by step; True when every step answered as it should."""
    url = stack.url
    names = {srv.address: f"pod-{i + 1}" for i, srv in enumerate(stack.fleet.servers)}
    ok = True
    async with aiohttp.ClientSession() as s:
        def show(label: str, status: int, want: int, where: str = "") -> None:
            nonlocal ok
            ok = ok and status == want
            print(f"  {label:46} {status:>4} {names.get(where, '')}")

        status, _ = await _status(s, url, None, "no key")
        show("no API key", status, 401)
        status, where = await _status(s, url, DEMO_KEY, "hello")
        show("team-a's key", status, 200, where)
        for i in range(5):
            status, where = await _status(s, url, TRIAL_KEY, f"trial {i}")
            show(f"trial key (3 requests per minute), request {i + 1}", status, 200 if i < 3 else 429, where)
        victim = stack.fleet.servers[1]

        async def kill_soon() -> None:  # while it is generating answers (non-streamed: no byte sent yet)
            await asyncio.sleep(0.08)
            await victim.crash(None)

        killer = asyncio.create_task(kill_soon())
        results = await asyncio.gather(*(_status(s, url, DEMO_KEY, f"during the kill {i}") for i in range(12)))
        await killer
        ok = ok and all(st == 200 for st, _ in results) and victim.address not in {w for _, w in results}
        print(f"  12 requests at once, {names[victim.address]} killed 80 ms in: statuses "
              f"{sorted({st for st, _ in results})}, served by {sorted({names.get(w, w) for _, w in results})}")
        async with s.get(f"http://127.0.0.1:{stack.cfg.admin_port}/stats?filter=inference_pool.upstream_rq_retry$") \
                as r:
            print(f"  Envoy: {(await r.text()).strip()}")
    if stack.picker.director.metering is not None:
        stack.picker.director.metering.flush()  # (written within 100 ms anyway)
    lines = await asyncio.to_thread(lambda: usage.read_text().splitlines())
    print(f"\n  usage lines (the last 3 of {len(lines)}):")
    for line in lines[-3:]:
        print("   ", line)
    return ok


async def run_demo(hold: bool = True) -> int:
    params = profile("h100-llama8b")
    async with in_process_stack(servers=4, params=params, decision_headers=True) as stack:
        metrics = stack.picker.bound_ports["metrics"] if stack.picker else 0
        print(f"live dashboard: http://127.0.0.1:{metrics}/dashboard  (open it now: it follows the traffic below)")
        names = ", ".join(f"pod-{i + 1}={s.address}" for i, s in enumerate(stack.fleet.servers))
        print(f"simulated vLLM fleet (h100-llama8b preset): {names}")
        print(f"epp on 127.0.0.1:{stack.picker.bound_ports['grpc'] if stack.picker else '?'}; "
              f"Envoy (FULL_DUPLEX_STREAMED ext_proc) on {stack.url}")
        print("pod-4 reports 40 waiting requests (pinned through its admin API), so epp avoids it.\n")
        rows = await traffic(stack)
        print(table(rows, stack))
        print("\nwhy = each scorer's score in [0, 1] for the chosen pod, the weighted total, and the runner-up.")
        with tempfile.TemporaryDirectory(prefix="epp-demo-gw-") as tmp:
            work = Path(tmp)
            usage = work / "usage.jsonl"
            config = f"apiKeys: {_keys(work / 'keys.yaml')}\nmetering: {{log: {usage}}}\n"
            async with gateway_stack(config, servers=3, params=params, workdir=work / "gateway") as gw:
                print(f"\nepp gateway (Envoy + the picker, one config) on {gw.url}, in front of 3 more pods:")
                gateway_ok = await gateway_demo(gw, usage)
                if not hold:
                    return 0 if all(r.status == 200 for r in rows) and gateway_ok else 1
                await _hold(stack, gw)
    return 0


async def _hold(stack: Stack, gw: GatewayStack) -> None:
    print("\nThe stacks stay up; try:")
    print(f"  curl -s {stack.url}/v1/chat/completions -H 'content-type: application/json' -d "
          "'{\"model\": \"meta-llama/Llama-3.1-8B-Instruct\", \"max_tokens\": 16, "
          "\"messages\": [{\"role\": \"user\", \"content\": \"hello\"}]}' -D - ")
    metrics = stack.picker.bound_ports["metrics"] if stack.picker else 0
    print(f"  the live dashboard: http://127.0.0.1:{metrics}/dashboard")
    print(f"  curl -s http://127.0.0.1:{metrics}/metrics")
    print(f"  curl -s {gw.url}/v1/models -H 'authorization: Bearer {DEMO_KEY}'")
    print(f"  curl -s {gw.url}/healthz -D -")
    print("Ctrl-C to stop.")
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.Event().wait()
