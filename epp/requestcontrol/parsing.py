"""OpenAI request parsing for the pick path, whatever the front end.

The body is parsed once with orjson to read what routing needs (model, prompt or messages);
the original bytes are what the gateway forwards, so nothing is re-serialised unless epp must
change the body (``mutated_body``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import orjson

from epp.request import InferenceRequest
from epp.requestcontrol.refused import Refused

GENERATION_PATHS = ("/v1/chat/completions", "/v1/completions")
_SLASHES = re.compile(r"/{2,}")


def route_path(path: str) -> str:
    """The path as routing reads it: no query, repeated slashes collapsed, lower case, so
    ``//V1/Completions?x`` cannot skip the body checks that ``/v1/completions`` gets."""
    path = path.split("?", 1)[0].split("#", 1)[0]
    if "//" in path:
        path = _SLASHES.sub("/", path)
    return path.lower()


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
    """Parse an OpenAI JSON body (``path`` as ``route_path`` gives it). Raises Refused(400)
    for bad JSON, a missing model, or messages / prompt of the wrong shape (what the model server
    would refuse anyway)."""
    req = InferenceRequest(request_id, path, headers=headers)
    if not body:
        raise Refused(400, "request body is empty; expected an OpenAI JSON request")
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise Refused(400, f"request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise Refused(400, "request body must be a JSON object")
    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise Refused(400, "missing 'model' in request body", param="model")
    req.model = model
    req.target_model = model
    req.body = data
    messages = data.get("messages")
    if messages is not None or req.chat:
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise Refused(400, "'messages' must be an array of message objects", param="messages")
        req.prompt = prompt_of_messages(messages)
    else:
        prompt = data.get("prompt")
        if not isinstance(prompt, str | list):
            raise Refused(400, "'prompt' must be a string or an array", param="prompt")
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


def from_fields(request_id: str, path: str, headers: Mapping[str, str], model: str, prompt: str | None,
                messages: list[dict[str, Any]] | None) -> InferenceRequest:
    """A request given as fields (the Pick API's model + prompt or messages) rather than a body."""
    if not model:
        raise Refused(400, "missing 'model'", param="model")
    text = prompt_of_messages(messages) if messages is not None else prompt or ""
    return InferenceRequest(request_id, path, model=model, prompt=text, headers=headers, target_model=model)
