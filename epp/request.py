"""OpenAI request parsing for the pick path.

The body is parsed once with orjson to read what routing needs (model, prompt or messages,
stream); the original bytes are what Envoy forwards, so nothing is re-serialised.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

GENERATION_PATHS = ("/v1/chat/completions", "/v1/completions")
_SLASHES = re.compile(r"/{2,}")


def route_path(path: str) -> str:
    """The path as routing reads it: no query, repeated slashes collapsed, lower case, so
    ``//V1/Completions?x`` cannot skip the body checks that ``/v1/completions`` gets."""
    path = path.split("?", 1)[0].split("#", 1)[0]
    if "//" in path:
        path = _SLASHES.sub("/", path)
    return path.lower()


class RequestError(Exception):
    """A request the picker must refuse; carries the HTTP status and an OpenAI-style message."""

    def __init__(self, status: int, message: str, err_type: str = "BadRequestError", param: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.err_type = err_type
        self.param = param

    def body(self) -> bytes:
        return orjson.dumps({"error": {"message": self.message, "type": self.err_type, "param": self.param,
                                       "code": self.status}})


@dataclass(slots=True)
class InferenceRequest:
    """What the scheduler sees of one request."""

    request_id: str
    path: str
    model: str = ""
    prompt: str = ""
    stream: bool = False
    headers: Mapping[str, str] = field(default_factory=dict)
    body_size: int = 0
    has_body: bool = False
    target_model: str = ""
    body: dict[str, Any] | None = None  # the parsed JSON (read-only: the bytes are what is forwarded)
    objective: str = ""  # the x-gateway-inference-objective header
    priority: int = 0  # the objective's priority; negative = sheddable

    @property
    def chat(self) -> bool:
        return self.path.startswith("/v1/chat/completions")


def mutated_body(req: InferenceRequest, include_usage: bool = False) -> bytes | None:
    """The body to forward when epp must change it (a model rewrite; epp asking a stream for
    usage), serialised once; None when the client's bytes go through untouched."""
    body = req.body
    rewrite = req.target_model != req.model
    if body is None or not (rewrite or include_usage):
        return None
    new = dict(body)
    if rewrite:
        new["model"] = req.target_model
    if include_usage:
        opts = body.get("stream_options")
        new["stream_options"] = {**opts, "include_usage": True} if isinstance(opts, dict) else {"include_usage": True}
    return orjson.dumps(new)


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def prompt_of_messages(messages: list[Any]) -> str:
    """A stable text rendering of chat messages for prefix hashing (role + content)."""
    parts = []
    for m in messages:
        if isinstance(m, dict):
            parts.append(f"<{m.get('role', '')}>{_content_text(m.get('content'))}")
    return "".join(parts)


def parse_body(request_id: str, path: str, headers: Mapping[str, str], body: bytes) -> InferenceRequest:
    """Parse an OpenAI JSON body (``path`` as ``route_path`` gives it). Raises RequestError(400)
    for bad JSON, a missing model, or messages / prompt of the wrong shape (what the model server
    would refuse anyway)."""
    req = InferenceRequest(request_id, path, headers=headers, body_size=len(body), has_body=True)
    if not body:
        raise RequestError(400, "request body is empty; expected an OpenAI JSON request")
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise RequestError(400, f"request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise RequestError(400, "request body must be a JSON object")
    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise RequestError(400, "missing 'model' in request body", param="model")
    req.model = model
    req.target_model = model
    req.body = data
    req.stream = data.get("stream") is True
    messages = data.get("messages")
    if messages is not None or req.chat:
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise RequestError(400, "'messages' must be an array of message objects", param="messages")
        req.prompt = prompt_of_messages(messages)
    else:
        prompt = data.get("prompt")
        if not isinstance(prompt, str | list):
            raise RequestError(400, "'prompt' must be a string or an array", param="prompt")
        if isinstance(prompt, str):
            req.prompt = prompt
        elif isinstance(prompt, list) and prompt:
            first = prompt[0]
            if isinstance(first, str):
                req.prompt = first
            elif isinstance(first, int):
                req.prompt = " ".join(map(str, prompt))
            elif isinstance(first, list):
                req.prompt = " ".join(map(str, first))
    return req


def headers_only(request_id: str, path: str, headers: Mapping[str, str]) -> InferenceRequest:
    """A request without a body (GET /v1/models, health checks...): routed on load only."""
    return InferenceRequest(request_id, path, model=headers.get("x-gateway-model-name", ""), headers=headers)
