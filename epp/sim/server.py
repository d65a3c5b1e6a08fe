"""One simulated vLLM server: the OpenAI HTTP API, /metrics, KV events and admin controls.

Admin API (for tests and demos), JSON on ``/admin``:
  GET  /admin                 state and engine counters
  POST /admin                 {"pin": {"num_requests_waiting": 50, ...}, "unpin": ["..."],
                               "metrics": "ok"|"fail"|"hang", "extra_latency_ms": 0,
                               "step_latency_ms": 0, "drain": false, "fail_status": 0, "crash_for_s": null,
                               "reset": false, "render_api": true}
  GET  /admin/requests        request log: path, body length, sha256, selected headers
  DELETE /admin/requests      clear the log
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import logging
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import orjson
import zmq.asyncio
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from epp.sim.engine import Engine, SimRequest
from epp.sim.kvevents import KVEventPublisher, KVEventsConfig
from epp.sim.metrics import PINNABLE, EngineMetrics
from epp.sim.profiles import EngineParams
from epp.sim.tokenizer import render_chat
from epp.tokenization import prompt_token_ids

log = logging.getLogger("epp.sim")

LOGGED_HEADERS = ("x-request-id", "x-gateway-destination-endpoint", "content-type", "content-length", "authorization",
                  "x-api-key",
                  "transfer-encoding", "x-gateway-inference-objective", "x-test-id", "x-data-parallel-host-port",
                  "x-prefiller-host-port")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


DATA_PARALLEL_HEADER = "x-data-parallel-host-port"  # the rank a pod's primary port hands a request to
PREFILLER_HEADER = "x-prefiller-host-port"  # P/D: the pod that computes the prompt for this decode pod
NOT_YET = -1  # a stream's next token is not made yet (token ids are not negative)


def error_response(status: int, message: str, err_type: str, param: str | None = None) -> web.Response:
    """vLLM's error shape."""
    body = {"error": {"message": message, "type": err_type, "param": param, "code": status}}
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")


def _timing_key(data: dict[str, Any], chat: bool) -> str:
    """What names a request in ``SimServer.timings``: its last message's content, or the end of
    its prompt."""
    if chat:
        messages = data.get("messages")
        last = messages[-1] if isinstance(messages, list) and messages else None
        content = last.get("content") if isinstance(last, dict) else None
        return content if isinstance(content, str) else ""
    prompt = data.get("prompt")
    return prompt[-200:] if isinstance(prompt, str) else ""


class SimServer:
    """A simulated vLLM server bound to one port."""

    def __init__(self, port: int, params: EngineParams, *, host: str = "127.0.0.1", seed: int = 0, index: int = 0,
                 kv_events: KVEventsConfig | None = None, zmq_ctx: zmq.asyncio.Context | None = None,
                 request_log_size: int = 10_000) -> None:
        self.host = host
        self.port = port
        self.params = params
        self.seed = seed
        self.index = index
        self.kv_events = kv_events.for_server(port, index) if kv_events else None
        self._zmq_ctx = zmq_ctx
        self.request_log: deque[dict[str, Any]] = deque(maxlen=request_log_size)
        # Each streamed request's (key, arrival at the HTTP handler, at the engine, first token),
        # monotonic: a benchmark in this process splits its clients' TTFT with them (the key is the
        # last message's content, or the prompt's last 200 characters).
        self.timings: deque[tuple[str, float, float, float]] = deque(maxlen=100_000)
        self.metrics_mode = "ok"
        self.extra_latency_s = 0.0
        self.draining = False
        self.fail_status = 0  # answer generation requests with this status (0: off)
        self.render_api = True  # vLLM's /v1/*/render (off: 403, as vllm serve without --enable-scale-out)
        self.render_calls = 0
        self.crashed = False
        self._metrics_release = asyncio.Event()
        self._ids = itertools.count()
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self._restart_task: asyncio.Task[None] | None = None
        self.engine: Engine
        self.metrics: EngineMetrics
        self.publisher: KVEventPublisher | None = None
        # This pod's data-parallel ranks by address (itself included; empty: not data-parallel).
        self.ranks: dict[str, SimServer] = {}
        self._client: aiohttp.ClientSession | None = None  # P/D: to the prefillers
        self._new_engine()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def _new_engine(self) -> None:
        self.metrics = EngineMetrics(str(self.params.data_parallel_rank), self.params.names()[0])
        self.engine = Engine(self.params, self.seed, observe=self.metrics.observe, publish=self._publish)
        self.metrics.attach(self.engine)

    def _publish(self, events: list[dict[str, Any]]) -> None:
        if self.publisher is not None:
            self.publisher.publish(events)

    # -- lifecycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        if self.kv_events and self.kv_events.enable_kv_cache_events and self.kv_events.publisher == "zmq":
            if self._zmq_ctx is None:
                self._zmq_ctx = zmq.asyncio.Context()
            self.publisher = KVEventPublisher(self.kv_events, self._zmq_ctx, self.params.data_parallel_rank)
        self.engine.start()
        if self._runner is None:
            app = web.Application(middlewares=[self._middleware], client_max_size=64 * 1024 * 1024)
            self._routes(app)
            self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
            await self._runner.setup()
        self._site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True)
        await self._site.start()

    async def stop(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None
        if self._restart_task is not None:
            self._restart_task.cancel()
        await self.engine.stop()
        if self.publisher is not None:
            await self.publisher.close()
            self.publisher = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def crash(self, down_for_s: float | None) -> None:
        """Die like a killed process: drop connections and state; come back after ``down_for_s``."""
        self.crashed = True
        if self._site is not None:
            await self._site.stop()
            self._site = None
        if self._runner is not None and self._runner.server is not None:
            for conn in list(self._runner.server.connections):
                conn.force_close()
        await self.engine.stop()
        if self.publisher is not None:
            await self.publisher.close()
            self.publisher = None
        self._new_engine()
        if down_for_s is not None:
            self._restart_task = asyncio.get_running_loop().create_task(self._restart_after(down_for_s))

    async def _restart_after(self, delay: float) -> None:
        await asyncio.sleep(delay)
        self.crashed = False
        self.draining = False
        await self.start()

    # -- plumbing ----------------------------------------------------------------------------------
    def _routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        app.router.add_post("/tokenize", self.tokenize)
        app.router.add_post("/v1/chat/completions/render", self.render_chat)
        app.router.add_post("/v1/completions/render", self.render_completions)
        app.router.add_get("/metrics", self.metrics_handler)
        app.router.add_post("/reset_prefix_cache", self.reset_prefix_cache)
        app.router.add_get("/admin", self.admin_get)
        app.router.add_post("/admin", self.admin_post)
        app.router.add_get("/admin/requests", self.admin_requests)
        app.router.add_delete("/admin/requests", self.admin_clear_requests)

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if not request.path.startswith(("/admin", "/metrics", "/health")):
            request["arrived"] = time.monotonic()
            body = await request.read()
            self.request_log.append({
                "ts": time.time(),
                "method": request.method,
                "path": request.path,
                "body_len": len(body),
                "sha256": hashlib.sha256(body).hexdigest(),
                "headers": {h: request.headers[h] for h in LOGGED_HEADERS if h in request.headers},
            })
        resp = await handler(request)
        if not resp.prepared:
            resp.headers["x-sim-port"] = str(self.port)
            resp.headers["x-sim-server"] = self.address
        return resp

    def _stream_headers(self) -> dict[str, str]:
        return {"content-type": "text/event-stream", "cache-control": "no-cache", "x-sim-port": str(self.port),
                "x-sim-server": self.address}

    # -- OpenAI API --------------------------------------------------------------------------------
    async def _parse(self, request: web.Request) -> dict[str, Any] | web.Response:
        if self.draining:
            return error_response(503, "server is draining", "ServiceUnavailableError")
        if self.fail_status:
            return error_response(self.fail_status, "failing as told (admin fail_status)", "InternalServerError")
        try:
            data = orjson.loads(await request.read())
        except orjson.JSONDecodeError as e:
            return error_response(400, f"malformed JSON body: {e}", "BadRequestError")
        if not isinstance(data, dict):
            return error_response(400, "request body must be a JSON object", "BadRequestError")
        model = data.get("model")
        if model is not None and model not in self.params.names() and model not in self.params.lora_adapters:
            return error_response(404, f"The model `{model}` does not exist.", "NotFoundError", "model")
        return data

    def _prompt_ids(self, data: dict[str, Any], chat: bool) -> list[int] | web.Response:
        ids = prompt_token_ids(data, chat, self.engine.tokenizer.encode, render_chat)
        if isinstance(ids, str):
            return error_response(400, ids, "BadRequestError", "messages" if chat else "prompt")
        return ids

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    async def _generate(self, request: web.Request, chat: bool) -> web.StreamResponse:
        rank = request.headers.get(DATA_PARALLEL_HEADER)
        if rank and self.ranks and rank != self.address:
            sibling = self.ranks.get(rank)
            if sibling is None:
                return error_response(400, f"{DATA_PARALLEL_HEADER} names {rank!r}, not a data-parallel rank "
                                      "of this pod", "BadRequestError")
            sibling.request_log.append({"ts": time.time(), "method": request.method, "path": request.path,
                                        "via": self.address})
            return await sibling._generate(request, chat)
        data = await self._parse(request)
        if isinstance(data, web.Response):
            return data
        prompt_ids = self._prompt_ids(data, chat)
        if isinstance(prompt_ids, web.Response):
            return prompt_ids
        p = self.params
        max_tokens = data.get("max_completion_tokens") or data.get("max_tokens") or p.default_max_tokens
        if not isinstance(max_tokens, int) or max_tokens < 1:
            return error_response(400, "max_tokens must be a positive integer", "BadRequestError", "max_tokens")
        if len(prompt_ids) + max_tokens > p.max_model_len:
            return error_response(
                400,
                f"This model's maximum context length is {p.max_model_len} tokens. However, you requested "
                f"{len(prompt_ids) + max_tokens} tokens ({len(prompt_ids)} in the messages, {max_tokens} in the "
                "completion). Please reduce the length of the messages or completion.",
                "BadRequestError")
        model = data.get("model") or p.names()[0]
        lora = model if model in p.lora_adapters else None
        salt = data.get("cache_salt")
        prefiller = request.headers.get(PREFILLER_HEADER)
        if prefiller and prefiller != self.address and not data.get("kv_transfer_params"):
            failed = await self._remote_prefill(prefiller, request.path, data, prompt_ids, lora,
                                                salt if isinstance(salt, str) else None)
            if failed is not None:
                return failed
        if self.extra_latency_s:
            await asyncio.sleep(self.extra_latency_s)
        req = self.engine.submit(prompt_ids, max_tokens, int(data.get("min_tokens") or 0),
                                 bool(data.get("ignore_eos")), lora, salt if isinstance(salt, str) else None)
        created = int(time.time())
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        try:
            if data.get("stream"):
                opts = data.get("stream_options") or {}
                include_usage = bool(isinstance(opts, dict) and opts.get("include_usage"))
                return await self._stream(request, req, chat, rid, created, model, include_usage,
                                          _timing_key(data, chat))
            return await self._complete(req, chat, rid, created, model)
        finally:
            if req.finish_reason is None:
                self.engine.abort(req)

    async def _remote_prefill(self, prefiller: str, path: str, data: dict[str, Any], prompt_ids: list[int],
                              lora: str | None, salt: str | None) -> web.Response | None:
        """P/D as llm-d's routing sidecar and vLLM's KV connector do it: the prefiller computes the
        prompt (one output token, ``kv_transfer_params.do_remote_decode``), then its KV blocks
        travel here (``kv_bytes_per_token`` / ``kv_transfer_gbytes_per_s``) and enter this engine's
        prefix cache, so the local request computes only the prompt's last partial block. None
        when done; an error response (502) when the prefiller failed."""
        body = {k: v for k, v in data.items() if k not in ("stream", "stream_options")}
        body.update(max_tokens=1, stream=False, kv_transfer_params={"do_remote_decode": True})
        body.pop("max_completion_tokens", None)
        if self._client is None:
            self._client = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600))
        try:
            async with self._client.post(f"http://{prefiller}{path}", data=orjson.dumps(body),
                                         headers={"content-type": "application/json"}) as r:
                answer = await r.read()
                if r.status != 200:
                    return error_response(502, f"prefiller {prefiller} answered {r.status}: "
                                          f"{answer[:200].decode(errors='replace')}", "InternalServerError")
        except (aiohttp.ClientError, TimeoutError) as e:
            return error_response(502, f"prefiller {prefiller} failed: {e}", "InternalServerError")
        p = self.params
        await asyncio.sleep(len(prompt_ids) * p.kv_bytes_per_token / (p.kv_transfer_gbytes_per_s * 1e9))
        self.engine.import_blocks(prompt_ids, lora, salt)
        return None

    def _usage(self, req: SimRequest) -> dict[str, Any]:
        n_out = len(req.output_ids)
        return {"prompt_tokens": len(req.prompt_ids), "total_tokens": len(req.prompt_ids) + n_out,
                "completion_tokens": n_out, "prompt_tokens_details": {"cached_tokens": max(req.cached_tokens, 0)}}

    async def _complete(self, req: SimRequest, chat: bool, rid: str, created: int, model: str) -> web.StreamResponse:
        tokens: list[int] = []
        while (tok := await req.queue.get()) is not None:
            tokens.append(tok)
        if self.crashed or req.finish_reason is None:
            raise web.HTTPServiceUnavailable()
        if req.finish_reason == "abort":
            return error_response(400, "prompt does not fit in the KV cache", "BadRequestError")
        text = self.engine.tokenizer.decode(tokens)
        choice: dict[str, Any]
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text, "refusal": None,
                                              "tool_calls": [], "reasoning_content": None},
                      "logprobs": None, "finish_reason": req.finish_reason, "stop_reason": None}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": req.finish_reason,
                      "stop_reason": None, "prompt_logprobs": None}
        body = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
                "model": model, "choices": [choice], "usage": self._usage(req), "system_fingerprint": None}
        return web.Response(body=orjson.dumps(body), content_type="application/json")

    async def _stream(self, request: web.Request, req: SimRequest, chat: bool, rid: str, created: int, model: str,
                      include_usage: bool, key: str) -> web.StreamResponse:
        resp = web.StreamResponse(headers=self._stream_headers())
        try:
            await resp.prepare(request)  # (the client may be gone already: an evicted request)
            obj = "chat.completion.chunk" if chat else "text_completion"

            def chunk(choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> bytes:
                body: dict[str, Any] = {"id": rid, "object": obj, "created": created, "model": model,
                                        "choices": choices}
                if usage is not None:
                    body["usage"] = usage
                return b"data: " + orjson.dumps(body) + b"\n\n"

            decode = self.engine.tokenizer.decode_one
            pending = await req.queue.get()
            if req.first_token_at is not None:
                self.timings.append((key, request.get("arrived", req.arrival), req.arrival, req.first_token_at))
            if chat:  # as vLLM: the role chunk goes with the first output, after the prefill
                await resp.write(chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                         "finish_reason": None}]))
            finish: str | None = None
            while pending is not None:
                # Each token goes out as soon as it is made, as vLLM streams: a request that ends
                # with this token had its end queued in the same step, so it is known now.
                nxt = req.queue.get_nowait() if not req.queue.empty() else NOT_YET
                finish = req.finish_reason if nxt is None else None
                text = decode(pending)
                if chat:
                    c = {"index": 0, "delta": {"content": text}, "logprobs": None, "finish_reason": finish}
                else:
                    c = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
                if finish is not None:
                    c["stop_reason"] = None
                await resp.write(chunk([c]))
                pending = await req.queue.get() if nxt == NOT_YET else nxt
            if finish is None and req.finish_reason is not None:  # ended after its last token (an abort)
                end: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": req.finish_reason,
                                       "stop_reason": None}
                await resp.write(chunk([{**end, "delta": {}} if chat else {**end, "text": ""}]))
            if self.crashed and request.transport is not None:
                request.transport.abort()
                return resp
            if include_usage:
                await resp.write(chunk([], self._usage(req)))
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
            return resp
        except ConnectionResetError:  # the client left, or this server "crashed"
            return resp

    async def models(self, request: web.Request) -> web.Response:
        now = int(time.time())
        p = self.params
        data = [{"id": n, "object": "model", "created": now, "owned_by": "vllm", "root": p.model, "parent": None,
                 "max_model_len": p.max_model_len} for n in p.names()]
        data += [{"id": a, "object": "model", "created": now, "owned_by": "vllm", "root": a, "parent": p.model,
                  "max_model_len": p.max_model_len} for a in p.lora_adapters]
        return web.Response(body=orjson.dumps({"object": "list", "data": data}), content_type="application/json")

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=503 if self.draining else 200)

    async def tokenize(self, request: web.Request) -> web.Response:
        data = await self._parse(request)
        if isinstance(data, web.Response):
            return data
        ids = self._prompt_ids(data, chat="messages" in data)
        if isinstance(ids, web.Response):
            return ids
        body = {"count": len(ids), "max_model_len": self.params.max_model_len, "tokens": ids, "token_strs": None}
        return web.Response(body=orjson.dumps(body), content_type="application/json")

    async def _render(self, request: web.Request, chat: bool) -> tuple[list[int], str] | web.Response:
        if not self.render_api:  # as vllm serve without --enable-scale-out answers
            return error_response(403, "Scale-out endpoints are disabled. Restart vllm serve with --enable-scale-out "
                                       "to enable them.", "PermissionDeniedError")
        data = await self._parse(request)
        if isinstance(data, web.Response):
            return data
        ids = self._prompt_ids(data, chat=chat)
        if isinstance(ids, web.Response):
            return ids
        self.render_calls += 1
        if self.extra_latency_s:
            await asyncio.sleep(self.extra_latency_s)
        return ids, str(data.get("request_id") or uuid.uuid4().hex)

    async def render_chat(self, request: web.Request) -> web.Response:
        """vLLM's render API: the GenerateRequest the server would run for this chat request."""
        out = await self._render(request, chat=True)
        if isinstance(out, web.Response):
            return out
        ids, rid = out
        return web.Response(body=orjson.dumps({"request_id": rid, "token_ids": ids, "features": None}),
                            content_type="application/json")

    async def render_completions(self, request: web.Request) -> web.Response:
        """vLLM's render API for completions: one GenerateRequest per prompt (one prompt here)."""
        out = await self._render(request, chat=False)
        if isinstance(out, web.Response):
            return out
        ids, rid = out
        return web.Response(body=orjson.dumps([{"request_id": rid, "token_ids": ids, "features": None}]),
                            content_type="application/json")

    async def reset_prefix_cache(self, request: web.Request) -> web.Response:
        ok = self.engine.reset_prefix_cache()
        return web.Response(status=200 if ok else 409)

    async def metrics_handler(self, request: web.Request) -> web.Response:
        if self.metrics_mode == "fail":
            return web.Response(status=500, text="metrics failure (admin)")
        if self.metrics_mode == "hang":
            self._metrics_release.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._metrics_release.wait(), timeout=300)
        return web.Response(body=self.metrics.render(),
                            headers={"content-type": CONTENT_TYPE_LATEST})

    # -- admin ---------------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        e = self.engine
        return {
            "port": self.port,
            "model": self.params.names()[0],
            "running": len(e.running),
            "waiting": len(e.waiting),
            "kv_cache_usage_perc": e.kv.usage(),
            "cached_blocks": len(e.kv.cached),
            "prefix_cache_queries": e.stats.prefix_queries,
            "prefix_cache_hits": e.stats.prefix_hits,
            "preemptions": e.stats.preemptions,
            "render_calls": self.render_calls,
            "steps": e.stats.steps,
            "step_late_ms_mean": round(1000 * e.stats.late_s / e.stats.steps, 3) if e.stats.steps else 0.0,
            "finished": dict(e.stats.finished),
            "pins": dict(self.metrics.pins),
            "metrics": self.metrics_mode,
            "extra_latency_ms": self.extra_latency_s * 1000,
            "step_latency_ms": e.extra_step_latency_s * 1000,
            "draining": self.draining,
            "fail_status": self.fail_status,
            "crashed": self.crashed,
            "requests_logged": len(self.request_log),
        }

    async def admin_get(self, request: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps(self.state()), content_type="application/json")

    async def admin_post(self, request: web.Request) -> web.Response:
        try:
            cmd = orjson.loads(await request.read())
            if not isinstance(cmd, dict):
                raise ValueError("expected a JSON object")
            await self.apply_admin(cmd)
        except (ValueError, TypeError, orjson.JSONDecodeError) as e:
            return error_response(400, str(e), "BadRequestError")
        return web.Response(body=orjson.dumps(self.state()), content_type="application/json")

    async def apply_admin(self, cmd: dict[str, Any]) -> None:
        """Apply one admin command (see the module docstring)."""
        unknown = set(cmd) - {"pin", "unpin", "metrics", "extra_latency_ms", "step_latency_ms", "drain",
                              "crash_for_s", "crash", "reset", "render_api", "fail_status"}
        if unknown:
            raise ValueError(f"unknown admin field(s): {', '.join(sorted(unknown))}")
        for name, value in (cmd.get("pin") or {}).items():
            if name not in PINNABLE:
                raise ValueError(f"cannot pin {name!r}; pinnable: {', '.join(PINNABLE)}")
            self.metrics.pins[name] = float(value)
        for name in cmd.get("unpin") or []:
            self.metrics.pins.pop(name, None)
        if "metrics" in cmd:
            if cmd["metrics"] not in ("ok", "fail", "hang"):
                raise ValueError("metrics must be ok, fail or hang")
            self.metrics_mode = cmd["metrics"]
            if self.metrics_mode != "hang":
                self._metrics_release.set()
        if "extra_latency_ms" in cmd:
            self.extra_latency_s = float(cmd["extra_latency_ms"]) / 1000
        if "step_latency_ms" in cmd:
            self.engine.extra_step_latency_s = float(cmd["step_latency_ms"]) / 1000
        if "drain" in cmd:
            self.draining = bool(cmd["drain"])
        if "fail_status" in cmd:
            self.fail_status = int(cmd["fail_status"])
        if "render_api" in cmd:
            self.render_api = bool(cmd["render_api"])
        if cmd.get("reset"):
            self.engine.reset_prefix_cache()
            self.request_log.clear()
        if cmd.get("crash") or "crash_for_s" in cmd:
            down = cmd.get("crash_for_s")
            # Answer the admin call first, then die.
            asyncio.get_running_loop().call_soon(
                lambda: asyncio.ensure_future(self.crash(None if down is None else float(down))))

    async def admin_requests(self, request: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps(list(self.request_log)), content_type="application/json")

    async def admin_clear_requests(self, request: web.Request) -> web.Response:
        self.request_log.clear()
        return web.Response(status=204)
