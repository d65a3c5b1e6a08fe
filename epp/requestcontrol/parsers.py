"""Request parsers (the reference's ``requestHandler.parsers``): which API a request body speaks,
and what routing reads from it (model, the prompt text for prefix matching, streaming).

- ``openai-parser``: chat/completions, completions, embeddings, responses, conversations,
  images/generations and the render paths (``chat/completions/render``, ``completions/render``).
- ``anthropic-parser``: the Messages API (``messages``, ``messages/count_tokens``): the model, and
  the system prompt and messages as text (text, thinking, tool use and tool results) so
  conversations share prefixes as they do on the server.
- ``passthrough-parser``: claims no path: the fallback; the body is not read (the request is
  routed on load, the model from ``x-gateway-model-name``), and nothing after it is consulted.

A path goes to the parser claiming its longest matching suffix (``/v1/chat/completions`` ->
``chat/completions``); none: the fallback, else a 400. Without a ``requestHandler`` section the
reference's defaults apply (openai, anthropic, passthrough; its vllmhttp parser is not
implemented, so its paths pass through).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Protocol

import orjson

from epp.request import InferenceRequest
from epp.requestcontrol.refused import Refused
from epp.scheduling.contract import Plugin
from epp.scheduling.params import Params

DEFAULT_PARSERS = ("openai-parser", "anthropic-parser", "passthrough-parser")


class Parser(Plugin, Protocol):
    """Reads one API's request bodies. ``paths``: the path suffixes it claims (none: the fallback,
    which takes every path no other parser claims)."""

    paths: ClassVar[tuple[str, ...]]

    def parse(self, request_id: str, path: str, headers: Mapping[str, str], body: bytes) -> InferenceRequest: ...


def _json_object(body: bytes) -> dict[str, Any]:
    if not body:
        raise Refused(400, "request body is empty; expected a JSON request")
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise Refused(400, f"request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise Refused(400, "request body must be a JSON object")
    return data


def _model(data: Mapping[str, Any]) -> str:
    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise Refused(400, "missing 'model' in request body", param="model")
    return model


def _text(content: Any) -> str:
    """The text of a content value: a string, or the text of its parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        out = []
        for p in content:
            if isinstance(p, str):
                out.append(p)
            elif isinstance(p, dict):
                for key in ("text", "thinking", "input_text", "output_text"):
                    if isinstance(p.get(key), str):
                        out.append(p[key])
                if p.get("type") == "tool_use":
                    out.append(f"{p.get('name', '')}{orjson.dumps(p.get('input')).decode()}")
                if p.get("type") == "tool_result":
                    out.append(_text(p.get("content")))
        return "".join(out)
    return ""


def prompt_of_messages(messages: Sequence[Any]) -> str:
    """A stable text rendering of chat messages for prefix hashing (role + content)."""
    return "".join(f"<{m.get('role', '')}>{_text(m.get('content'))}" for m in messages if isinstance(m, dict))


def _request(request_id: str, path: str, headers: Mapping[str, str], data: dict[str, Any], api: str,
             prompt: str) -> InferenceRequest:
    model = _model(data)
    return InferenceRequest(request_id, path, model=model, prompt=prompt, headers=headers, target_model=model,
                            body=data, api=api)


def _completion_prompt(prompt: Any) -> str:
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt:
        first = prompt[0]
        if isinstance(first, str):
            return first
        if isinstance(first, int):
            return " ".join(map(str, prompt))
        if isinstance(first, list):
            return " ".join(map(str, first))
    return ""


# path suffix -> the API it is (openai-parser), most specific first where they share an ending
OPENAI_APIS = (("chat/completions/render", "chat"), ("completions/render", "completions"),
               ("chat/completions", "chat"), ("completions", "completions"), ("embeddings", "embeddings"),
               ("responses", "responses"), ("conversations", "conversations"), ("images/generations", "images"))


class OpenAIParser(Parser):
    type_name: ClassVar[str] = "openai-parser"
    paths: ClassVar[tuple[str, ...]] = tuple(p for p, _ in OPENAI_APIS)

    def __init__(self, name: str, params: Params) -> None:
        self.name = name
        params.done()

    def parse(self, request_id: str, path: str, headers: Mapping[str, str], body: bytes) -> InferenceRequest:
        data = _json_object(body)
        api = next((a for suffix, a in OPENAI_APIS if matches(path, suffix)), "completions")
        if api == "chat" or data.get("messages") is not None:
            messages = data.get("messages")
            if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
                raise Refused(400, "'messages' must be an array of message objects", param="messages")
            return _request(request_id, path, headers, data, "chat", prompt_of_messages(messages))
        if api == "completions":
            prompt = data.get("prompt")
            if not isinstance(prompt, str | list):
                raise Refused(400, "'prompt' must be a string or an array", param="prompt")
            return _request(request_id, path, headers, data, api, _completion_prompt(prompt))
        if api == "embeddings":
            return _request(request_id, path, headers, data, api, _completion_prompt(data.get("input")))
        if api == "responses":
            given = data.get("input")
            text = given if isinstance(given, str) else prompt_of_messages(given) if isinstance(given, list) else ""
            instructions = data.get("instructions")
            prefix = f"<system>{instructions}" if isinstance(instructions, str) and instructions else ""
            return _request(request_id, path, headers, data, api, prefix + text)
        if api == "conversations":
            items = data.get("items")
            return _request(request_id, path, headers, data, api,
                            prompt_of_messages(items) if isinstance(items, list) else "")
        return _request(request_id, path, headers, data, api, _text(data.get("prompt")))


class AnthropicParser(Parser):
    type_name: ClassVar[str] = "anthropic-parser"
    paths: ClassVar[tuple[str, ...]] = ("messages", "messages/count_tokens")

    def __init__(self, name: str, params: Params) -> None:
        self.name = name
        params.done()

    def parse(self, request_id: str, path: str, headers: Mapping[str, str], body: bytes) -> InferenceRequest:
        data = _json_object(body)
        messages = data.get("messages")
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise Refused(400, "'messages' must be an array of message objects", param="messages")
        system = _text(data.get("system"))
        prompt = (f"<system>{system}" if system else "") + prompt_of_messages(messages)
        return _request(request_id, path, headers, data, "messages", prompt)


class PassthroughParser(Parser):
    type_name: ClassVar[str] = "passthrough-parser"
    paths: ClassVar[tuple[str, ...]] = ()

    def __init__(self, name: str, params: Params) -> None:
        self.name = name
        params.done()

    def parse(self, request_id: str, path: str, headers: Mapping[str, str], body: bytes) -> InferenceRequest:
        return headers_only(request_id, path, headers)


def headers_only(request_id: str, path: str, headers: Mapping[str, str]) -> InferenceRequest:
    """A request whose body is not read (none, or passed through): routed on load only."""
    return InferenceRequest(request_id, path, model=headers.get("x-gateway-model-name", ""), headers=headers)


def matches(path: str, suffix: str) -> bool:
    """``path`` ends with the whole segments of ``suffix`` (``/v1/chat/completions`` ends with
    ``chat/completions`` and with ``completions``; ``/v1/xcompletions`` with neither)."""
    return path.rstrip("/") == suffix or path.rstrip("/").endswith("/" + suffix)


class ParserTable:
    """The configured parsers in order; ``resolve`` picks the one for a path."""

    def __init__(self, parsers: Sequence[Parser]) -> None:
        self.claims: list[tuple[str, Parser]] = []
        self.fallback: Parser | None = None
        self._resolved: dict[str, Parser | None] = {}  # path -> its parser (a few paths carry the traffic)
        seen: set[str] = set()
        for p in parsers:
            if p.type_name in seen:
                continue  # the reference keeps the first of a type
            seen.add(p.type_name)
            if not p.paths:
                self.fallback = p  # it takes every path no one claims: the ones after it never see one
                break
            self.claims.extend((suffix, p) for suffix in p.paths)

    def resolve(self, path: str) -> Parser | None:
        if path in self._resolved:
            return self._resolved[path]
        found = self._resolve(path)
        if len(self._resolved) >= 256:  # clients choose paths: the memo stays bounded
            self._resolved.clear()
        self._resolved[path] = found
        return found

    def _resolve(self, path: str) -> Parser | None:
        best: tuple[int, Parser] | None = None
        for suffix, p in self.claims:
            if matches(path, suffix) and (best is None or len(suffix) > best[0]):
                best = (len(suffix), p)
        return best[1] if best is not None else self.fallback


PARSERS: tuple[type[Any], ...] = (OpenAIParser, AnthropicParser, PassthroughParser)


def default_parsers() -> ParserTable:
    """The reference's default parsers (openai, anthropic, then the passthrough fallback)."""
    by_type = {cls.type_name: cls for cls in PARSERS}
    return ParserTable([by_type[t](t, Params({}, t)) for t in DEFAULT_PARSERS])
ROLE: tuple[type[Any], str] = (Parser, "parser")
