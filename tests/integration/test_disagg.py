"""P/D through a real Envoy: epp sends a long uncached prompt to a decode pod with the prefill pod
in x-prefiller-host-port; the simulated decode pod has the prefiller compute the prompt, receives
its KV blocks and decodes; a short or cached prompt stays on the decode pod alone."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest

from epp.sim.profiles import profile
from epp.stack.local import in_process_stack

from .conftest import completion_body, post

CONFIG = (Path(__file__).resolve().parents[1] / "fixtures" / "pd-config.yaml").read_text()
ROLES = [{"llm-d.ai/role": "prefill"}, {"llm-d.ai/role": "prefill"}, {"llm-d.ai/role": "decode"},
         {"llm-d.ai/role": "decode"}]
DOC = "the quarterly report of the northern region, with its tables and notes " * 60  # ~1,100 tokens


@pytest.mark.parametrize("template", ["epp-full-duplex", "epp-buffered"])
async def test_the_decode_pod_fetches_the_prompt_from_the_prefill_pod_epp_named(template: str) -> None:
    params = profile("fast").with_overrides(num_gpu_blocks=4096)
    async with in_process_stack(servers=4, params=params, labels=ROLES, template=template, config_text=CONFIG,
                                decision_headers=True) as stack, aiohttp.ClientSession() as s:
        prefill_pods, decode_pods = stack.fleet.servers[:2], stack.fleet.servers[2:]
        status, headers, body = await post(s, f"{stack.url}/v1/completions", completion_body(DOC, max_tokens=8),
                                           headers={"content-type": "application/json"})
        assert status == 200, body
        decode = stack.server(headers["x-epp-endpoint"])
        assert decode in decode_pods and decode.engine.stats.remote_prefills == 1
        logged = [e for e in decode.request_log if e["path"] == "/v1/completions"]
        prefiller = logged[-1]["headers"]["x-prefiller-host-port"]
        assert prefiller in {p.address for p in prefill_pods}
        computed = stack.server(prefiller)
        assert computed.engine.stats.prompt_tokens > 1000  # the prefill pod computed the prompt
        assert decode.engine.stats.prefix_hits > 1000  # the decode pod found it in its cache, received
        # The same document again: cached on the decode pod now, so no prefill pod is involved.
        status, headers, _ = await post(s, f"{stack.url}/v1/completions",
                                        completion_body(DOC + " and one more question", max_tokens=4),
                                        headers={"content-type": "application/json"})
        assert status == 200 and stack.server(headers["x-epp-endpoint"]) is decode
        assert decode.engine.stats.remote_prefills == 1
        status, headers, _ = await post(s, f"{stack.url}/v1/completions", completion_body("hello", max_tokens=4),
                                        headers={"content-type": "application/json"})
        assert status == 200 and stack.server(headers["x-epp-endpoint"]) in decode_pods
        assert sum(p.engine.stats.remote_prefills for p in decode_pods) == 1


async def test_a_failing_prefiller_is_a_502_with_an_openai_error() -> None:
    async with in_process_stack(servers=4, labels=ROLES, config_text=CONFIG) as stack, aiohttp.ClientSession() as s:
        for p in stack.fleet.servers[:2]:
            p.draining = True  # the prefill pods answer 503
        status, _, body = await post(s, f"{stack.url}/v1/completions", completion_body(DOC, max_tokens=4),
                                     headers={"content-type": "application/json"})
        assert status == 502 and b"prefiller" in body and b'"error"' in body
