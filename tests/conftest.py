"""Shared fixtures: the recorded real-vLLM fixtures directory."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import msgpack
import pytest
import uvloop

FIXTURES = Path(__file__).parent / "fixtures" / "vllm-0.32"


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, Any]:
    """Run async tests on uvloop, the loop `epp serve` and `epp sim` use."""
    return {"uvloop": uvloop.new_event_loop}


@pytest.fixture(scope="session")
def vllm_metrics_text() -> str:
    return (FIXTURES / "metrics.txt").read_text()


@pytest.fixture(scope="session")
def vllm_kv_frames() -> list[dict[str, Any]]:
    """The real server's KV-event frames, decoded: topic, seq, payload."""
    raw = json.loads((FIXTURES / "kv_events.json").read_text())
    out = []
    for f in raw["frames"]:
        payload = base64.b64decode(f["payload_b64"])
        out.append({"topic": f["topic"], "seq": f["seq"], "payload": payload,
                    "batch": msgpack.unpackb(payload, strict_map_key=False)})
    return out
