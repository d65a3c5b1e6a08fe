"""`epp demo` (what `make demo` runs): a 4-server simulated fleet + epp + a real Envoy on
localhost, a short burst of mixed traffic, a table of where each request went and why, then the
stack stays up until Ctrl-C."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import aiohttp
import orjson

from epp.sim.profiles import profile
from epp.stack.local import Stack, in_process_stack

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


async def run_demo(hold: bool = True) -> int:
    params = profile("h100-llama8b")
    async with in_process_stack(servers=4, params=params, decision_headers=True) as stack:
        names = ", ".join(f"pod-{i + 1}={s.address}" for i, s in enumerate(stack.fleet.servers))
        print(f"simulated vLLM fleet (h100-llama8b preset): {names}")
        print(f"epp on 127.0.0.1:{stack.picker.bound_ports['grpc'] if stack.picker else '?'}; "
              f"Envoy (FULL_DUPLEX_STREAMED ext_proc) on {stack.url}")
        print("pod-4 reports 40 waiting requests (pinned through its admin API), so epp avoids it.\n")
        rows = await traffic(stack)
        print(table(rows, stack))
        print("\nwhy = each scorer's score in [0, 1] for the chosen pod, the weighted total, and the runner-up.")
        if not hold:
            return 0 if all(r.status == 200 for r in rows) else 1
        print("\nThe stack stays up; try:")
        print(f"  curl -s {stack.url}/v1/chat/completions -H 'content-type: application/json' -d "
              "'{\"model\": \"meta-llama/Llama-3.1-8B-Instruct\", \"max_tokens\": 16, "
              "\"messages\": [{\"role\": \"user\", \"content\": \"hello\"}]}' -D - ")
        print(f"  curl -s http://127.0.0.1:{stack.picker.bound_ports['metrics'] if stack.picker else 0}/metrics")
        print("Ctrl-C to stop.")
        await asyncio.Event().wait()
    return 0
