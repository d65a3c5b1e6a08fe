"""``token-producer`` (the reference's): the prompt's token ids, before scheduling, for the plugins
that read them (the ``precise-prefix-cache-producer``, the prompt-length readers).

Backends, chosen as the reference chooses them:
- ``vllm`` (or ``modelName`` alone): the model server renders the prompt itself, so the ids are
  exactly the ones it will compute: ``POST {url}/v1/chat/completions/render`` or
  ``/v1/completions/render`` (vLLM's render API: ``vllm launch render`` or ``vllm serve
  --enable-scale-out``), the body forwarded with ``model`` set to ``modelName``; ``timeout`` (5s)
  for text, ``mmTimeout`` (30s) when a message has content parts. A server without the render
  API (403/404) is asked its ``/tokenize`` instead, which renders chat the same way.
- ``estimate`` (the default when nothing is set): no tokenizer, the prompt's bytes packed four to
  a pseudo-token (counts are right to ~25%; the ids never match a server's blocks, so the precise
  producer does not treat them as tokens).
- ``tokenizer`` (epp's own): a local Hugging Face tokenizer directory or an installed tokenizer
  name (epp.tokenization), no sidecar.
``udsTokenizerConfig`` (deprecated in the reference) and the multimodal estimation knobs are
refused as not supported.

Rendering is I/O before scheduling: ``prepare`` sets the ids now when it can (pre-tokenized
prompts, the in-process backends, the cache) and otherwise returns what fetches them (called
and awaited by the director, off the pick path). Rendered ids are cached (``cacheSizeTokens``,
epp's own, 2M tokens, keyed by everything in the body that can change the prompt). A render that
fails or times out is logged (at most every 30 s, with a count) and the request goes on without
ids: their readers fall back, as in the reference.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from array import array
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import Any, ClassVar, Protocol

import orjson
from prometheus_client.core import CounterMetricFamily, Metric

from epp.request import InferenceRequest
from epp.scheduling.contract import ExportsMetrics, LoadsResources, Plugin
from epp.scheduling.params import Params
from epp.scheduling.types import ConfigError
from epp.tokenization import PromptTokenizer, TokenizerError, load_tokenizer

log = logging.getLogger("epp.tokens")

DEFAULT_URL = "http://localhost:8000"
BYTES_PER_TOKEN = 4  # the reference's estimate
CACHE_TOKENS = 2_000_000
MAX_RENDER_BYTES = 64 << 20  # a render answer (a 1M-token prompt's ids are ~8 MB of JSON)
ERROR_LOG_EVERY = 30.0
# Fields that cannot change the rendered prompt: left out of the cache key (and nothing else is).
NOT_PROMPT = frozenset({
    "model", "stream", "stream_options", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
    "min_p", "n", "seed", "stop", "stop_token_ids", "user", "logprobs", "top_logprobs", "presence_penalty",
    "frequency_penalty", "repetition_penalty", "ignore_eos", "min_tokens", "logit_bias", "response_format",
    "priority", "request_id", "cache_salt", "kv_transfer_params", "vllm_xargs", "metadata", "service_tier",
})


class Tokenizes(Plugin, Protocol):
    """A request-control plugin that gives requests their token ids before scheduling:
    ``prepare`` sets ``request.token_ids`` now, or returns what fetches them (call it, await the
    result; None: done, with or without ids)."""

    def prepare(self, request: InferenceRequest) -> Callable[[], Awaitable[None]] | None: ...

    async def close(self) -> None:
        """Release what it holds open (connections to a render server)."""


class TokenCache:
    """Token ids by prompt key, least recently used out first, bounded in tokens."""

    def __init__(self, max_tokens: int) -> None:
        self.max_tokens = max_tokens
        self.tokens = 0
        self._ids: OrderedDict[bytes, array[int]] = OrderedDict()

    def get(self, key: bytes) -> list[int] | None:
        ids = self._ids.get(key)
        if ids is None:
            return None
        self._ids.move_to_end(key)
        return ids.tolist()

    def put(self, key: bytes, ids: list[int]) -> None:
        if not self.max_tokens or len(ids) > self.max_tokens:
            return
        old = self._ids.pop(key, None)
        if old is not None:
            self.tokens -= len(old)
        self._ids[key] = array("I", ids)
        self.tokens += len(ids)
        while self.tokens > self.max_tokens:
            _, dropped = self._ids.popitem(last=False)
            self.tokens -= len(dropped)

    def __len__(self) -> int:
        return len(self._ids)


def prompt_key(request: InferenceRequest) -> bytes | None:
    """What identifies the rendered prompt: the kind of request and every body field that can
    change it (None: no body)."""
    body = request.body
    if body is None:
        return None
    kept = {k: v for k, v in body.items() if k not in NOT_PROMPT}
    try:
        raw = orjson.dumps([kind_of(request), kept], option=orjson.OPT_SORT_KEYS)
    except TypeError:
        return None
    return hashlib.blake2b(raw, digest_size=16).digest()


# The request kinds the producer tokenizes -> vLLM's render path and whether it answers a list.
RENDER_PATHS = {"chat": ("/v1/chat/completions/render", False), "completions": ("/v1/completions/render", True),
                "messages": ("/v1/messages/render", False)}


def kind_of(request: InferenceRequest) -> str:
    """chat, completions or messages (what the parser read; the path when no parser did)."""
    return request.api or ("chat" if request.chat else "completions")


def pretokenized(body: Mapping[str, Any], chat: bool) -> list[int] | None:
    """A completions prompt given as token ids (one prompt): the ids themselves."""
    if chat:
        return None
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], list):
        prompt = prompt[0]
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0
                                                   for t in prompt):
        return list(prompt)
    return None


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # content parts: their text (other parts carry no bytes here)
        return "".join(p.get("text", "") for p in value if isinstance(p, Mapping) and isinstance(p.get("text"), str))
    return ""


def estimate_bytes(body: Mapping[str, Any], chat: bool) -> bytes:
    """The bytes the reference's estimate packs: for chat (and Anthropic messages) the tools
    (JSON), the system prompt, then each message's role and text; for completions the prompt."""
    if chat:
        out = bytearray()
        tools = body.get("tools")
        if tools:
            out += orjson.dumps(tools)
        out += _text(body.get("system")).encode()
        messages = body.get("messages")
        for m in messages if isinstance(messages, list) else ():
            if isinstance(m, Mapping):
                out += _text(m.get("role")).encode()
                out += _text(m.get("content")).encode()
        return bytes(out)
    prompt = body.get("prompt")
    if isinstance(prompt, list):
        prompt = "".join(p for p in prompt if isinstance(p, str))
    return _text(prompt).encode()


def pack_bytes(raw: bytes) -> list[int]:
    """Four bytes to a pseudo-token (little endian; the last one zero-padded)."""
    pad = (-len(raw)) % BYTES_PER_TOKEN
    data = raw + b"\0" * pad
    return [int.from_bytes(data[i:i + BYTES_PER_TOKEN], "little") for i in range(0, len(data), BYTES_PER_TOKEN)]


def has_content_parts(body: Mapping[str, Any]) -> bool:
    messages = body.get("messages")
    return isinstance(messages, list) and any(isinstance(m, Mapping) and isinstance(m.get("content"), list)
                                              and m.get("content") for m in messages)


class RenderError(Exception):
    """The render backend could not give ids for a request (the message says why)."""


class RenderClient:
    """vLLM's render API over HTTP/1.1 (one connection pool per producer, made on first use)."""

    def __init__(self, url: str, model: str, timeout: float, mm_timeout: float) -> None:
        self.url = url.rstrip("/")
        self.model = model
        self.timeout = timeout
        self.mm_timeout = mm_timeout
        self.tokenize_only = False  # the server has no render API: /tokenize instead
        self._session: Any = None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def render(self, body: Mapping[str, Any], kind: str) -> list[int]:
        import aiohttp

        if self._session is None:
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit_per_host=16))
        payload = {**body, "model": self.model}
        payload.pop("stream", None)
        payload.pop("stream_options", None)
        chat = kind != "completions"
        timeout = self.mm_timeout if chat and has_content_parts(body) else self.timeout
        path, listed = RENDER_PATHS[kind]
        if not self.tokenize_only:
            status, data = await self._post(path, payload, timeout)
            if _no_render_api(status, data):
                log.warning("token-producer: %s%s answered %d (no render API; vllm serve needs --enable-scale-out): "
                            "using its /tokenize from now on", self.url, path, status)
                self.tokenize_only = True
            else:
                return _render_ids(status, data, listed)
        if kind == "messages":
            raise RenderError("the server has no render API, and /tokenize does not read Anthropic messages")
        status, data = await self._post("/tokenize", _tokenize_body(payload, chat), timeout)
        if status != 200 or not isinstance(data, dict) or not _ids_ok(data.get("tokens")):
            raise RenderError(f"/tokenize answered {status}: {_snippet(data)}")
        tokens: list[int] = data["tokens"]
        return tokens

    async def _post(self, path: str, payload: Mapping[str, Any], timeout: float) -> tuple[int, Any]:
        import aiohttp

        try:
            async with asyncio.timeout(timeout):
                async with self._session.post(self.url + path, data=orjson.dumps(payload),
                                              headers={"content-type": "application/json"}) as resp:
                    raw = await resp.content.read(MAX_RENDER_BYTES + 1)
                    if len(raw) > MAX_RENDER_BYTES:
                        raise RenderError(f"{self.url}{path} answered more than {MAX_RENDER_BYTES >> 20} MiB")
        except TimeoutError:
            raise RenderError(f"{self.url}{path} did not answer within {timeout:g}s") from None
        except (aiohttp.ClientError, OSError) as e:
            raise RenderError(f"{self.url}{path}: {type(e).__name__}: {e}") from None
        try:
            return resp.status, orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            return resp.status, raw[:200].decode(errors="replace")


def _no_render_api(status: int, data: Any) -> bool:
    """vLLM without the render API: 403 (scale-out disabled), or a route that does not exist (404
    without an OpenAI error body: an unknown model is a 404 with one)."""
    return status in (403, 405) or (status == 404 and not (isinstance(data, dict) and "error" in data))


def _ids_ok(ids: Any) -> bool:
    return isinstance(ids, list) and bool(ids) and all(isinstance(t, int) and not isinstance(t, bool) for t in ids)


def _snippet(data: Any) -> str:
    text = data if isinstance(data, str) else orjson.dumps(data).decode()
    return text[:200]


def _render_ids(status: int, data: Any, listed: bool) -> list[int]:
    """vLLM's GenerateRequest (chat, messages) or a list of them, one per prompt (completions)."""
    if status != 200:
        raise RenderError(f"render answered {status}: {_snippet(data)}")
    item = data if not listed else (data[0] if isinstance(data, list) and len(data) == 1 else None)
    ids: Any = item.get("token_ids") if isinstance(item, dict) else None
    if not _ids_ok(ids):
        raise RenderError(f"render answer without token_ids: {_snippet(data)}")
    out: list[int] = ids
    return out


def _tokenize_body(payload: Mapping[str, Any], chat: bool) -> dict[str, Any]:
    """vLLM's /tokenize request for the same prompt (chat: the template with the generation prompt)."""
    if chat:
        keep = ("messages", "tools", "chat_template", "chat_template_kwargs", "add_generation_prompt",
                "continue_final_message", "documents")
        out = {k: payload[k] for k in keep if k in payload}
        out.setdefault("add_generation_prompt", True)
        return {"model": payload.get("model"), **out, "add_special_tokens": False}
    prompt = payload.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    return {"model": payload.get("model"), "prompt": prompt}


class TokenProducer(Tokenizes, LoadsResources, ExportsMetrics):
    type_name: ClassVar[str] = "token-producer"

    def __init__(self, name: str, params: Params) -> None:
        self.name = name
        model = params.text("modelName") or ""
        vllm = params.section("vllm")
        estimate = params.section("estimate")
        self.tokenizer_spec = params.text("tokenizer")
        params.refuse("udsTokenizerConfig", "the deprecated gRPC-over-UDS tokenizer; use vllm.url or tokenizer")
        self.cache = TokenCache(params.int("cacheSizeTokens", CACHE_TOKENS, minimum=0, maximum=10**9))
        params.done()
        chosen = [k for k, on in (("estimate", estimate is not None), ("vllm", vllm is not None or bool(model)),
                                  ("tokenizer", bool(self.tokenizer_spec))) if on]
        if len(chosen) > 1:
            raise ConfigError(params.path, f"only one of 'estimate', 'vllm' (or 'modelName'), 'tokenizer' may be set "
                                           f"(got {', '.join(chosen)})")
        self.backend = chosen[0] if chosen else "estimate"
        self.client: RenderClient | None = None
        if estimate is not None:
            for key in ("image", "video"):
                estimate.refuse(key, "multimodal token estimation")
            estimate.done()
        if self.backend == "vllm":
            v = vllm or Params({}, f"{params.path}.vllm")
            url = v.text("url") or DEFAULT_URL
            timeout, mm_timeout = v.duration("timeout", 5.0), v.duration("mmTimeout", 30.0)
            v.done()
            if not model:
                raise ConfigError(f"{params.path}.modelName", "required with vllm (the model the server renders for)")
            if not url.startswith("http://"):
                raise ConfigError(f"{params.path}.vllm.url",
                                  f"expected an http:// URL (TLS is not supported, as in the reference), got {url!r}")
            self.client = RenderClient(url, model, timeout, mm_timeout)
        self.tokenizer: PromptTokenizer | None = None
        self.counts: dict[str, int] = {}
        self._errors = 0
        self._last_error_log = 0.0

    @property
    def real(self) -> bool:
        """Whether the ids are the model's tokens (not the byte estimate)."""
        return self.backend != "estimate"

    def load(self) -> None:
        if self.tokenizer_spec and self.tokenizer is None:
            try:
                self.tokenizer = load_tokenizer(self.tokenizer_spec)
            except TokenizerError as e:
                raise ConfigError(f"{self.name}.tokenizer", str(e)) from None

    async def close(self) -> None:
        """Close the render client's connections (the process stops, or a reload replaced it)."""
        if self.client is not None:
            await self.client.close()

    def _count(self, result: str) -> None:
        self.counts[result] = self.counts.get(result, 0) + 1

    def prepare(self, request: InferenceRequest) -> Callable[[], Awaitable[None]] | None:
        body = request.body
        kind = kind_of(request)
        if body is None or kind not in RENDER_PATHS:  # embeddings, responses...: no ids (as the reference's render)
            return None
        chat = kind != "completions"
        ids = pretokenized(body, chat)
        if ids is not None:
            self._set(request, ids, "given")
            return None
        if self.backend == "estimate":
            self._set(request, pack_bytes(estimate_bytes(body, chat)) or None, "estimated", real=False)
            return None
        key = prompt_key(request)
        if key is not None:
            cached = self.cache.get(key)
            if cached is not None:
                self._set(request, cached, "cached")
                return None
        if self.tokenizer is not None:
            ids = self.tokenizer.token_ids(body, chat) if kind != "messages" else None
            self._set(request, ids, "tokenized" if ids else "failed")
            if ids and key is not None:
                self.cache.put(key, ids)
            return None
        return lambda: self._fetch(request, key)

    def _set(self, request: InferenceRequest, ids: list[int] | None, result: str, real: bool = True) -> None:
        self._count(result)
        if ids:
            request.token_ids = ids
            request.real_tokens = real

    async def _fetch(self, request: InferenceRequest, key: bytes | None) -> None:
        assert self.client is not None and request.body is not None
        try:
            ids = await self.client.render(request.body, kind_of(request))
        except RenderError as e:
            self._failed(request, str(e))
            return
        if key is not None:
            self.cache.put(key, ids)
        self._set(request, ids, "rendered")

    def _failed(self, request: InferenceRequest, why: str) -> None:
        self._count("failed")
        self._errors += 1
        now = time.monotonic()
        if now - self._last_error_log >= ERROR_LOG_EVERY:
            log.warning("%s: no token ids for request %s (%d failures since the last line): %s; it is routed "
                        "without them", self.name, request.request_id or "-", self._errors, why)
            self._errors = 0
            self._last_error_log = now

    def metric_families(self, pool: str) -> Iterator[Metric]:
        fam = CounterMetricFamily("epp_token_producer_requests",
                                  "Requests the token producer saw, by how they got their token ids (rendered, "
                                  "cached, tokenized, estimated, given, failed).", labels=["name", "plugin", "result"])
        for result, n in sorted(self.counts.items()):
            fam.add_metric([pool, self.name, result], n)
        yield fam
