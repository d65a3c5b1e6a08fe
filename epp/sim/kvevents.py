"""KV-cache events over ZMQ, framed exactly as vLLM's ZmqEventPublisher frames them.

Frames: [topic, seq (8-byte big-endian), msgpack payload]; payload = [ts, [events], dp_rank].
The PUB socket binds when the endpoint has ``*`` or ``::`` or is ipc:// / inproc://, and connects
otherwise (so a subscriber on tcp://127.0.0.1:N must bind). An optional ROUTER socket serves
replays: a request [identity, b"", start_seq] gets every buffered batch with seq >= start_seq,
then an end marker with seq -1 and an empty payload.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import msgpack
import zmq
import zmq.asyncio
from zmq import Flag, SocketOption, SocketType
from zmq.error import Again

END_SEQ = (-1).to_bytes(8, "big", signed=True)
_PLACEHOLDER = re.compile(r"\{(port|index)([+-]\d+)?\}")


@dataclass(frozen=True, slots=True)
class KVEventsConfig:
    """The shape of vLLM's ``--kv-events-config`` (only the zmq publisher)."""

    enable_kv_cache_events: bool = False
    publisher: str = "zmq"
    endpoint: str = "tcp://*:5557"
    replay_endpoint: str | None = None
    buffer_steps: int = 10_000
    hwm: int = 100_000
    topic: str = ""

    @classmethod
    def parse(cls, text: str) -> KVEventsConfig:
        """Parse the JSON flag value; unknown fields are an error."""
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"--kv-events-config: not JSON: {e}") from None
        if not isinstance(raw, dict):
            raise ValueError("--kv-events-config: expected a JSON object")
        known = set(cls.__dataclass_fields__) | {"max_queue_size"}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"--kv-events-config: unknown field(s) {', '.join(unknown)}")
        raw.pop("max_queue_size", None)
        if raw.get("publisher", "zmq") not in ("zmq", "null"):
            raise ValueError(f"--kv-events-config.publisher: unsupported {raw['publisher']!r} (zmq or null)")
        return cls(**raw)

    def for_server(self, port: int, index: int) -> KVEventsConfig:
        """Expand ``{port}``, ``{port+N}``, ``{index}`` placeholders (endpoints and topic) for one
        server of a fleet."""

        def sub(text: str | None) -> str | None:
            if text is None:
                return None

            def repl(m: re.Match[str]) -> str:
                base = port if m.group(1) == "port" else index
                return str(base + int(m.group(2) or 0))

            return _PLACEHOLDER.sub(repl, text)

        return KVEventsConfig(self.enable_kv_cache_events, self.publisher, sub(self.endpoint) or "",
                              sub(self.replay_endpoint), self.buffer_steps, self.hwm, sub(self.topic) or "")


def binds(endpoint: str) -> bool:
    """vLLM's rule: bind for wildcard / ipc / inproc endpoints, connect otherwise."""
    return "*" in endpoint or "::" in endpoint or endpoint.startswith(("ipc://", "inproc://"))


def encode_batch(events: list[dict[str, Any]], dp_rank: int, ts: float | None = None) -> bytes:
    out: bytes = msgpack.packb([time.time() if ts is None else ts, events, dp_rank], use_bin_type=True)
    return out


class KVEventPublisher:
    """Publishes batches for one engine; serves replays."""

    def __init__(self, config: KVEventsConfig, ctx: zmq.asyncio.Context, dp_rank: int = 0) -> None:
        self.config = config
        self.dp_rank = dp_rank
        self._ctx = ctx
        self._topic = config.topic.encode()
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=config.buffer_steps)
        self._seq = 0
        self._pub = ctx.socket(SocketType.PUB)
        self._pub.setsockopt(SocketOption.SNDHWM, config.hwm)
        self._pub.setsockopt(SocketOption.LINGER, 0)
        if binds(config.endpoint):
            self._pub.bind(config.endpoint)
        else:
            self._pub.connect(config.endpoint)
        self._replay: zmq.asyncio.Socket | None = None
        self._replay_task: asyncio.Task[None] | None = None
        if config.replay_endpoint:
            self._replay = ctx.socket(SocketType.ROUTER)
            self._replay.setsockopt(SocketOption.LINGER, 0)
            self._replay.bind(config.replay_endpoint)
            self._replay_task = asyncio.get_running_loop().create_task(self._serve_replay())

    def publish(self, events: list[dict[str, Any]]) -> None:
        payload = encode_batch(events, self.dp_rank)
        seq = self._seq
        self._seq += 1
        self._buffer.append((seq, payload))
        with contextlib.suppress(Again):
            self._pub.send_multipart((self._topic, seq.to_bytes(8, "big"), payload), flags=Flag.NOBLOCK)

    async def _serve_replay(self) -> None:
        assert self._replay is not None
        while True:
            frames = await self._replay.recv_multipart()
            if len(frames) != 3:
                continue
            client, _, start = frames
            start_seq = int.from_bytes(start, "big")
            for seq, payload in list(self._buffer):
                if seq >= start_seq:
                    await self._replay.send_multipart((client, b"", seq.to_bytes(8, "big"), payload))
            await self._replay.send_multipart((client, b"", END_SEQ, b""))

    async def close(self) -> None:
        if self._replay_task is not None:
            self._replay_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._replay_task
        self._pub.close(0)
        if self._replay is not None:
            self._replay.close(0)
