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
from epp.requestcontrol.parsers import OpenAIParser, prompt_of_messages
from epp.requestcontrol.refused import Refused
from epp.scheduling.params import Params

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


def parse_body(request_id: str, path: str, headers: Mapping[str, str], body: bytes) -> InferenceRequest:
    """An OpenAI body as the openai-parser reads it (Refused 400 for a bad one)."""
    return OpenAIParser(OpenAIParser.type_name, Params({}, "openai-parser")).parse(request_id, path, headers, body)


def from_fields(request_id: str, path: str, headers: Mapping[str, str], model: str, prompt: str | None,
                messages: list[dict[str, Any]] | None) -> InferenceRequest:
    """A request given as fields (the Pick API's model + prompt or messages) rather than a body."""
    if not model:
        raise Refused(400, "missing 'model'", param="model")
    text = prompt_of_messages(messages) if messages is not None else prompt or ""
    return InferenceRequest(request_id, path, model=model, prompt=text, headers=headers, target_model=model)
