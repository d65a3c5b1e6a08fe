"""requestHandler.parsers through a real Envoy: an Anthropic Messages request is read by the
anthropic-parser (its shared system prompt routes to one pod), a path no configured parser claims
is a 400 in OpenAI's error shape, and the passthrough fallback routes on load alone."""

from __future__ import annotations

from collections import Counter

import aiohttp
import orjson

from epp.stack.local import in_process_stack

from .conftest import post

SYSTEM = "You are the reference desk of a railway museum; answer in two sentences. " * 12


def config(parsers: str) -> str:
    return f"""apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: prefix-cache-scorer
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins: [{{pluginRef: prefix-cache-scorer}}, {{pluginRef: max-score-picker}}]
{parsers}
"""


def messages(question: str) -> bytes:
    return orjson.dumps({"model": "sim-model", "max_tokens": 16, "system": SYSTEM,
                         "messages": [{"role": "user", "content": [{"type": "text", "text": question}]}]})


async def test_anthropic_messages_are_parsed_and_routed_by_their_prefix() -> None:
    async with in_process_stack(servers=3, config_text=config(""), decision_headers=True) as stack, \
            aiohttp.ClientSession() as s:
        chosen = Counter()
        for i in range(6):
            # The simulator does not serve the Messages API: the pod answers 404, after epp routed it.
            status, headers, _ = await post(s, f"{stack.url}/v1/messages", messages(f"question {i}"))
            assert status == 404
            chosen[headers["x-epp-endpoint"]] += 1
        assert len(chosen) == 1  # the shared system prompt: one pod
        status, _, body = await post(s, f"{stack.url}/v1/messages", orjson.dumps({"model": "sim-model"}))
        assert status == 400 and "'messages' must be an array" in orjson.loads(body)["error"]["message"]


async def test_a_path_no_parser_claims_is_a_400_and_passthrough_routes_the_rest() -> None:
    strict = config("requestHandler:\n  parsers: [{pluginRef: openai-parser}]")
    async with in_process_stack(servers=2, config_text=strict) as stack, aiohttp.ClientSession() as s:
        status, _, body = await post(s, f"{stack.url}/v1/messages", messages("q"))
        assert status == 400
        err = orjson.loads(body)["error"]
        assert "no parser of requestHandler.parsers claims the path '/v1/messages'" in err["message"]
        status, _, _ = await post(s, f"{stack.url}/v1/chat/completions", orjson.dumps(
            {"model": "sim-model", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}))
        assert status == 200
    passthrough = config("requestHandler:\n  parsers: [{pluginRef: passthrough-parser}]")
    async with in_process_stack(servers=2, config_text=passthrough) as stack, aiohttp.ClientSession() as s:
        # Not read at all: even a body the openai-parser would refuse goes to a pod, untouched.
        status, _, _ = await post(s, f"{stack.url}/v1/chat/completions", b'{"messages": "not a list"}')
        assert status == 400  # the pod's own answer (the simulator, like vLLM, checks the body)
        assert stack.picker is not None
        refused = stack.picker.metrics.sample_value(
            "llm_d_epp_request_error_total", {"model_name": "", "target_model_name": "", "fairness_id": "default-flow",
                                              "priority": "0", "error_code": "400"})
        assert not refused  # epp did not refuse it
