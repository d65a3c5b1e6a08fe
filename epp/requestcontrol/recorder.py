"""The request recorder: finished requests as trace records, for the offline tuner (``epp record``).

A record says what a replay needs and no more: when the request arrived, its model and API, the
chained hashes of its prompt's 64-character blocks (which prompts share which prefix, without the
text), its size, what it asked for (stream, max_tokens) and what it got (tokens, cached tokens,
status, time to first byte, duration), its priority and its flow (the fairness id, hashed). The
prompt itself only when the operator started epp with
``--record-prompts`` and the recording asks for it. Records go to the open recordings only: with
none open the recorder costs one attribute check per request.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import orjson
import xxhash

from epp.observability.events import end
from epp.request import InferenceRequest
from epp.requestcontrol.headers import FAIRNESS_ID, header

BLOCK_CHARS = 64  # 16 tokens at the approximate index's 4 characters per token
MAX_BLOCKS = 512  # 32K characters; the rest of a longer prompt is its length only
QUEUE = 4096  # records a slow recording may fall behind before it loses some (counted)


def block_hashes(model: str, prompt: str) -> list[str]:
    """Chained xxh3 hashes (48 bits, hex) of the prompt's full blocks: equal prefixes, equal lists."""
    data = prompt.encode("utf-8", "surrogatepass")
    seed = xxhash.xxh3_64_intdigest(model.encode())
    n = min(len(data) // BLOCK_CHARS, MAX_BLOCKS)
    return [f"{xxhash.xxh3_64_intdigest(data[:end], seed) >> 16:012x}"
            for end in range(BLOCK_CHARS, n * BLOCK_CHARS + 1, BLOCK_CHARS)]


def flow_label(fairness_id: str) -> str | None:
    """The request's flow (its fairness id or tenant) as a hash: which requests share a flow,
    without the tenant's name."""
    return f"{xxhash.xxh3_64_intdigest(fairness_id.encode()) >> 16:012x}" if fairness_id else None


@dataclass(slots=True)
class Outcome:
    """What the response told (as the director's response series have it)."""

    status: int
    endpoint: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int | None
    ttft_s: float | None
    duration_s: float
    stream: bool


class Recording:
    """One open recording: its records wait here until its client reads them."""

    def __init__(self, prompts: bool) -> None:
        self.prompts = prompts
        self.queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=QUEUE)
        self.dropped = 0


class Recorder:
    def __init__(self, allow_prompts: bool = False) -> None:
        self.allow_prompts = allow_prompts  # --record-prompts: recordings may ask for the prompt text
        self.recordings: set[Recording] = set()

    @property
    def active(self) -> bool:
        return bool(self.recordings)

    def open(self, prompts: bool) -> Recording:
        if prompts and not self.allow_prompts:
            raise PermissionError("this epp does not record prompt text (start it with --record-prompts)")
        r = Recording(prompts)
        self.recordings.add(r)
        return r

    def close(self, recording: Recording) -> None:
        self.recordings.discard(recording)

    def finished(self, request: InferenceRequest, outcome: Outcome) -> None:
        """A request ended: one record to each open recording."""
        body = request.body or {}
        record: dict[str, Any] = {
            "t": round(time.time() - (time.perf_counter() - request.arrived if request.arrived else 0.0), 4),
            "model": request.model, "target_model": request.target_model or request.model, "api": request.api,
            "path": request.path, "stream": outcome.stream, "max_tokens": _int(body.get("max_tokens")
                                                                                or body.get("max_completion_tokens")),
            "prompt_chars": len(request.prompt), "blocks": block_hashes(request.model, request.prompt),
            "prompt_tokens": outcome.prompt_tokens, "completion_tokens": outcome.completion_tokens,
            "cached_tokens": outcome.cached_tokens, "status": outcome.status, "endpoint": outcome.endpoint,
            "ttft_ms": None if outcome.ttft_s is None else round(outcome.ttft_s * 1000, 2),
            "duration_ms": round(outcome.duration_s * 1000, 2), "priority": request.priority,
            "flow": flow_label(request.tenant or header(request.headers, FAIRNESS_ID))}
        plain = b"data: " + orjson.dumps(record) + b"\n\n"
        with_prompt = None
        for r in self.recordings:
            if r.prompts:
                if with_prompt is None:
                    with_prompt = b"data: " + orjson.dumps({**record, "prompt": request.prompt}) + b"\n\n"
                line = with_prompt
            else:
                line = plain
            try:
                r.queue.put_nowait(line)
            except asyncio.QueueFull:
                r.dropped += 1

    def stop(self) -> None:
        """End every open recording (their readers see the end of the stream)."""
        for r in list(self.recordings):
            end(r.queue)


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None
