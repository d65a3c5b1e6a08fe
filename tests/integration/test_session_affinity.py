"""session-affinity-scorer through a real Envoy: epp writes the session token on the response,
and a client that echoes it back stays on its pod (both body modes)."""

from __future__ import annotations

import base64

import aiohttp
import pytest

from epp.stack.local import in_process_stack

from .conftest import completion_body, post

CONFIG = """\
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: queue-scorer
- type: session-affinity-scorer
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - {pluginRef: queue-scorer, weight: 1}
  - {pluginRef: session-affinity-scorer, weight: 10}
  - {pluginRef: max-score-picker}
"""


@pytest.mark.parametrize("template", ["epp-full-duplex", "epp-buffered"])
async def test_a_client_echoing_the_session_token_stays_on_its_pod(template: str) -> None:
    # Idle pods tie on the queue: without the token the picker breaks ties at random.
    async with in_process_stack(servers=3, template=template, config_text=CONFIG,
                                decision_headers=True) as stack, aiohttp.ClientSession() as s:
        url = f"{stack.url}/v1/completions"
        status, headers, _ = await post(s, url, completion_body("hello"), headers={"content-type": "application/json"})
        assert status == 200
        token = headers["x-session-token"]
        pod = headers["x-epp-endpoint"]
        assert base64.b64decode(token).decode() == pod
        served = set()
        for i in range(8):
            status, h, _ = await post(s, url, completion_body(f"turn {i}"),
                                      headers={"content-type": "application/json", "x-session-token": token})
            assert status == 200 and h["x-session-token"] == token
            served.add(h["x-epp-endpoint"])
        assert served == {pod}
        spread = set()
        for i in range(12):  # without the token the queue scorer's ties go at random
            _, h, _ = await post(s, url, completion_body(f"other {i}"), headers={"content-type": "application/json"})
            spread.add(h["x-epp-endpoint"])
        assert len(spread) > 1


async def test_the_token_is_written_without_decision_headers_too() -> None:
    async with in_process_stack(servers=2, config_text=CONFIG) as stack, aiohttp.ClientSession() as s:
        url = f"{stack.url}/v1/completions"
        _, headers, _ = await post(s, url, completion_body("hello"), headers={"content-type": "application/json"})
        assert "x-epp-endpoint" not in headers
        assert base64.b64decode(headers["x-session-token"]).decode() in stack.addresses
