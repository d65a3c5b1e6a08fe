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


# Envoy keeps one HTTP/2 connection per thread to the ext_proc cluster; one stream per connection
# makes the kernel spread the streams over the workers (SO_REUSEPORT hashes each new connection),
# and a request's pick and observer streams reach different ones.
ONE_STREAM_PER_CONNECTION: dict[str, Any] = {"typed_extension_protocol_options": {
    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
        "common_http_protocol_options": {"max_requests_per_connection": 1},
        "explicit_http_config": {"http2_protocol_options": {}}}}}
