"""API keys through a real Envoy: no key, a wrong one or an inactive one is a 401 in OpenAI's
error shape that reaches no model server; a valid key routes, its tenant is the fairness id and
its tier the objective (priority); a bad edit of the file keeps the old keys, a good one applies."""

from __future__ import annotations

import hashlib
from pathlib import Path

import aiohttp
import orjson

from epp.stack.local import in_process_stack, wait_until

from .conftest import post

KEY_A = "sk-team-a-0123456789abcdef"
KEY_B = "sk-batch-fedcba9876543210"
KEY_C = "sk-team-c-00001111222233334444"
OBJECTIVES = """apiVersion: llm-d.ai/v1alpha2
kind: InferenceObjective
metadata: {name: premium}
spec: {priority: 10, poolRef: {group: llm-d.ai, kind: InferencePool, name: default}}
"""


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def keys_file(*entries: str) -> str:
    return "keys:\n" + "".join(f"- {e}\n" for e in entries)


async def test_keys_guard_the_pool_and_name_the_tenant(tmp_path: Path) -> None:
    f = tmp_path / "keys.yaml"
    f.write_text(keys_file(f"{{id: a, sha256: {sha(KEY_A)}, tenant: team-a, tier: premium}}",
                           f"{{id: b, sha256: {sha(KEY_B)}, tenant: batch, active: false}}"))
    chat = orjson.dumps({"model": "sim-model", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]})
    async with in_process_stack(servers=2, objectives_text=OBJECTIVES,
                                serve={"api_keys_file": str(f), "config_poll_interval": 0.05}) as stack, \
            aiohttp.ClientSession() as s:
        url = f"{stack.url}/v1/chat/completions"
        for headers, message in (({}, "missing API key"), ({"authorization": "Bearer sk-wrong-000000000000"},
                                                           "invalid API key"),
                                 ({"x-api-key": KEY_B}, "API key 'b' is inactive")):
            status, _, body = await post(s, url, chat, headers=headers)
            assert status == 401, body
            err = orjson.loads(body)["error"]
            assert err["type"] == "AuthenticationError" and message in err["message"]
        served = sum(len(stack.server(a).request_log) for a in stack.addresses)
        assert served == 0  # no refused request reached a model server
        status, _, _ = await post(s, url, chat, headers={"authorization": f"Bearer {KEY_A}",
                                                         "x-llm-d-inference-fairness-id": "someone-else"})
        assert status == 200
        assert stack.picker is not None
        m = stack.picker.metrics
        assert m.sample_value("llm_d_epp_request_total", {"model_name": "sim-model", "target_model_name": "sim-model",
                                                          "fairness_id": "team-a", "priority": "10"}) == 1
        f.write_text("keys: [")  # a bad edit: logged, the old keys stay
        watcher = stack.picker.keys_watcher
        assert watcher is not None

        async def rejected() -> bool:
            return watcher.rejected > 0

        await wait_until(rejected, 5, "the bad edit to be seen")
        status, _, _ = await post(s, url, chat, headers={"x-api-key": KEY_A})
        assert status == 200
        f.write_text(keys_file(f"{{id: c, sha256: {sha(KEY_C)}, tenant: team-c}}"))

        async def rotated() -> bool:
            status, _, _ = await post(s, url, chat, headers={"x-api-key": KEY_C})
            return status == 200

        await wait_until(rotated, 5, "the new key")
        status, _, _ = await post(s, url, chat, headers={"x-api-key": KEY_A})
        assert status == 401  # rotated out


async def test_a_key_over_its_limits_gets_429_with_the_rate_headers(tmp_path: Path) -> None:
    f = tmp_path / "keys.yaml"
    f.write_text(keys_file(f"{{id: trial, sha256: {sha(KEY_A)}, tenant: trial, "
                           "limits: {requestsPerMinute: 3, tokensPerMinute: 100000}}"))
    chat = orjson.dumps({"model": "sim-model", "max_tokens": 4, "ignore_eos": True, "stream": True,
                         "messages": [{"role": "user", "content": "hi"}]})
    async with in_process_stack(servers=2, serve={"api_keys_file": str(f)}) as stack, aiohttp.ClientSession() as s:
        url, auth = f"{stack.url}/v1/chat/completions", {"x-api-key": KEY_A}
        remaining = []
        for _ in range(3):
            status, headers, body = await post(s, url, chat, headers=auth)
            assert status == 200 and b'"usage"' not in body  # epp asked the stream for usage, and cut it out
            remaining.append(headers["x-ratelimit-remaining-requests"])
            assert headers["x-ratelimit-limit-tokens"] == "100000"
        assert remaining == ["2", "1", "0"]
        status, headers, body = await post(s, url, chat, headers=auth)
        assert status == 429 and orjson.loads(body)["error"]["type"] == "RateLimitError"
        assert int(headers["retry-after"]) >= 1 and headers["x-ratelimit-remaining-requests"] == "0"
        assert stack.picker is not None
        tokens = stack.picker.director.rate_limits.headers(stack.picker.director.keys.check(auth))  # type: ignore[union-attr]
        assert int(dict(tokens)["x-ratelimit-remaining-tokens"]) < 100000  # the streams' usage was charged
