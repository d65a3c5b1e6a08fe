"""Request parsers (requestHandler.parsers): the reference's types, path resolution by the longest
claimed suffix, the fallback, and the config surface."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from epp.config import parse_config
from epp.requestcontrol.parsers import (
    AnthropicParser,
    OpenAIParser,
    ParserTable,
    PassthroughParser,
    matches,
)
from epp.requestcontrol.refused import Refused
from epp.scheduling.params import Params
from epp.scheduling.types import ConfigError


def make(cls: type[Any]) -> Any:
    return cls(cls.type_name, Params({}, "p"))


OPENAI, ANTHROPIC, PASS = make(OpenAIParser), make(AnthropicParser), make(PassthroughParser)


def body(**fields: Any) -> bytes:
    return orjson.dumps({"model": "m", **fields})


@pytest.mark.parametrize(("path", "fields", "api", "prompt"), [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}, "chat", "<user>hi"),
    ("/v1/chat/completions/render", {"messages": [{"role": "user", "content": "hi"}]}, "chat", "<user>hi"),
    ("/v1/completions", {"prompt": "once"}, "completions", "once"),
    ("/v1/completions", {"prompt": [1, 2, 3]}, "completions", "1 2 3"),
    ("/v1/embeddings", {"input": "embed me"}, "embeddings", "embed me"),
    ("/v1/embeddings", {"input": ["first", "second"]}, "embeddings", "first"),
    ("/v1/responses", {"input": "question", "instructions": "be brief"}, "responses", "<system>be briefquestion"),
    ("/v1/responses", {"input": [{"role": "user", "content": [{"type": "input_text", "text": "q"}]}]},
     "responses", "<user>q"),
    ("/v1/images/generations", {"prompt": "a cat"}, "images", "a cat"),
])
def test_openai_parser_reads_each_api(path: str, fields: dict[str, Any], api: str, prompt: str) -> None:
    r = OPENAI.parse("id", path, {}, body(**fields))
    assert (r.model, r.api, r.prompt) == ("m", api, prompt)
    assert r.body is not None and r.body["model"] == "m"


def test_anthropic_parser_reads_the_system_prompt_and_the_content_blocks() -> None:
    r = ANTHROPIC.parse("id", "/v1/messages", {}, body(
        system=[{"type": "text", "text": "You are terse."}],
        messages=[{"role": "user", "content": "hi"},
                  {"role": "assistant", "content": [{"type": "thinking", "thinking": "hmm"},
                                                    {"type": "tool_use", "name": "look", "input": {"q": 1}}]},
                  {"role": "user", "content": [{"type": "tool_result", "content": [{"type": "text", "text": "42"}]}]}]))
    assert r.api == "messages" and r.model == "m"
    assert r.prompt == '<system>You are terse.<user>hi<assistant>hmmlook{"q":1}<user>42'


@pytest.mark.parametrize(("parser", "path", "raw", "message"), [
    (OPENAI, "/v1/chat/completions", b"", "request body is empty"),
    (OPENAI, "/v1/chat/completions", b"{", "not valid JSON"),
    (OPENAI, "/v1/chat/completions", b'{"messages": []}', "missing 'model'"),
    (OPENAI, "/v1/chat/completions", b'{"model": "m", "messages": "hi"}', "'messages' must be an array"),
    (OPENAI, "/v1/completions", b'{"model": "m", "prompt": 3}', "'prompt' must be a string or an array"),
    (ANTHROPIC, "/v1/messages", b'{"model": "m"}', "'messages' must be an array"),
])
def test_bad_bodies_are_400s(parser: Any, path: str, raw: bytes, message: str) -> None:
    with pytest.raises(Refused, match=message) as e:
        parser.parse("id", path, {}, raw)
    assert e.value.status == 400


def test_the_longest_claimed_suffix_wins_and_the_fallback_takes_the_rest() -> None:
    table = ParserTable([OPENAI, ANTHROPIC, PASS])
    assert table.resolve("/v1/chat/completions") is OPENAI
    assert table.resolve("/v1/messages") is ANTHROPIC
    assert table.resolve("/v1/messages/count_tokens") is ANTHROPIC
    assert table.resolve("/v1/unknown") is PASS
    assert ParserTable([OPENAI]).resolve("/v1/messages") is None
    assert ParserTable([PASS, OPENAI]).resolve("/v1/chat/completions") is PASS  # nothing after the fallback
    assert matches("/v1/chat/completions", "completions") and not matches("/v1/xcompletions", "completions")
    r = PASS.parse("id", "/v1/anything", {"x-gateway-model-name": "m2"}, b"not json")
    assert r.model == "m2" and r.body is None


def doc(extra: str, plugins: str = "") -> str:
    return f"""apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: queue-scorer
{plugins}
schedulingProfiles:
- name: default
  plugins: [{{pluginRef: queue-scorer}}]
{extra}
"""


def table_of(text: str) -> ParserTable:
    cfg = parse_config(text)
    _, instances = cfg.build()
    table = cfg.runtime(instances).parsers
    assert table is not None
    return table


def test_the_config_names_the_parsers_or_gets_the_references_defaults() -> None:
    default = table_of(doc(""))
    assert default.resolve("/v1/messages").type_name == "anthropic-parser"  # type: ignore[union-attr]
    assert default.resolve("/v1/other").type_name == "passthrough-parser"  # type: ignore[union-attr]
    only = table_of(doc("requestHandler:\n  parsers: [{pluginRef: openai-parser}]"))  # made by its type name
    assert only.resolve("/v1/messages") is None and only.fallback is None
    named = table_of(doc("requestHandler:\n  parsers: [{pluginRef: mine}]", "- {name: mine, type: anthropic-parser}"))
    assert named.resolve("/v1/messages").name == "mine"  # type: ignore[union-attr]
    old = table_of(doc("parser: {pluginRef: passthrough-parser}"))  # the deprecated top-level field
    assert old.resolve("/v1/chat/completions").type_name == "passthrough-parser"  # type: ignore[union-attr]


@pytest.mark.parametrize(("extra", "plugins", "error"), [
    ("requestHandler:\n  parsers: [{pluginRef: queue-scorer}]", "", r"requestHandler\.parsers\[0\]\.pluginRef: "
                                                                      r"'queue-scorer' is a scorer, not a parser"),
    ("requestHandler:\n  parsers: [{pluginRef: nope}]", "",
     r"requestHandler\.parsers\[0\]\.pluginRef: no plugin named"),
    ("requestHandler:\n  parsers: [{pluginRef: vllmgrpc-parser}]", "", r"'vllmgrpc-parser' is not supported by epp"),
    ("requestHandler:\n  parsers: {pluginRef: openai-parser}", "", r"requestHandler\.parsers: expected a list"),
    ("requestHandler:\n  parser: []", "", r"requestHandler\.parser: unknown field"),
    ("", "- type: vllmhttp-parser", r"'vllmhttp-parser' is not supported by epp"),
])
def test_bad_parser_config_names_the_field(extra: str, plugins: str, error: str) -> None:
    with pytest.raises(ConfigError, match=error):
        parse_config(doc(extra, plugins))
