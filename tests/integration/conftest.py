from __future__ import annotations

import hashlib
from typing import Any

import aiohttp
import orjson


def completion_body(prompt: str, max_tokens: int = 2, **extra: Any) -> bytes:
    return orjson.dumps({"model": "sim-model", "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True,
                         **extra})


def chat_body(content: str, max_tokens: int = 2, **extra: Any) -> bytes:
    return orjson.dumps({"model": "sim-model", "messages": [{"role": "user", "content": content}],
                         "max_tokens": max_tokens, "ignore_eos": True, **extra})


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


async def post(session: aiohttp.ClientSession, url: str, body: bytes | Any, **kw: Any) -> tuple[int, dict[str, str],
                                                                                                 bytes]:
    async with session.post(url, data=body, **kw) as r:
        return r.status, {k.lower(): v for k, v in r.headers.items()}, await r.read()
