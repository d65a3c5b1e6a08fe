"""Prompt -> token ids, the way the model server does it, so epp can compute a request's KV blocks.

A tokenizer spec is either the name of an installed tokenizer (the ``epp.tokenizers``
entry-point group: epp registers ``sim``, the simulator's, for fleets of ``epp sim`` servers, so
this module never imports the simulator) or the path of a local Hugging Face tokenizer
directory (``tokenizer.json`` + ``tokenizer_config.json`` and/or ``chat_template.jinja``), read
with the ``tokenizers`` library and rendered with jinja2 in the same sandbox settings
transformers uses (trim_blocks, lstrip_blocks, loop controls, a tojson that does not escape
HTML, raise_exception, strftime_now), as vLLM's OpenAI server does: chat requests are rendered
with ``add_generation_prompt`` and encoded WITHOUT special tokens, completion prompts are
encoded WITH them.

A tokenizer returns None for a request it cannot reproduce (multimodal parts, a template error):
the caller then routes that request on the approximate index.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from importlib import metadata
from pathlib import Path
from typing import Any, Protocol


class PromptTokenizer(Protocol):
    name: str

    def token_ids(self, body: Mapping[str, Any], chat: bool) -> list[int] | None: ...


class TokenizerError(ValueError):
    """A tokenizer directory that cannot be loaded."""


def prompt_token_ids(body: Mapping[str, Any], chat: bool, encode: Callable[[str], list[int]],
                     render: Callable[[list[Any]], str | None]) -> list[int] | str:
    """The prompt's token ids, or an error message naming the bad field (OpenAI request shapes)."""
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return "'messages' must be a non-empty list"
        text = render(messages)
        return "cannot render 'messages' with the chat template" if text is None else encode(text)
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return encode(prompt)
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]
        if isinstance(prompt, str):
            return encode(prompt)
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return list(prompt)
    return "'prompt' must be a string or a list of token ids (one prompt)"


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json writes special tokens as strings or as {"content": ...} objects."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return str(value["content"])
    return None


def _string_content(content: Any) -> Any:
    """vLLM's "string" content format: a list of text parts becomes their texts joined by newlines;
    None when a part is not text (images, audio: not reproducible here)."""
    if not isinstance(content, list):
        return content
    texts = []
    for part in content:
        if not isinstance(part, Mapping) or part.get("type", "text") != "text" or not isinstance(part.get("text"), str):
            return None
        texts.append(part["text"])
    return "\n".join(texts)


class HFPromptTokenizer:
    """A local Hugging Face tokenizer directory."""

    def __init__(self, path: str) -> None:
        try:
            from tokenizers import Tokenizer
        except ImportError as e:  # pragma: no cover - a dependency of epp
            raise TokenizerError(f"the 'tokenizers' package is needed for tokenizer {path!r}: {e}") from None
        d = Path(path)
        tj = d / "tokenizer.json"
        if not tj.is_file():
            raise TokenizerError(f"{path}: no tokenizer.json (a Hugging Face tokenizer directory is expected)")
        try:
            self._tok = Tokenizer.from_file(str(tj))
        except Exception as e:
            raise TokenizerError(f"{tj}: cannot load: {e}") from None
        config: dict[str, Any] = {}
        cfg_file = d / "tokenizer_config.json"
        if cfg_file.is_file():
            try:
                config = json.loads(cfg_file.read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise TokenizerError(f"{cfg_file}: {e}") from None
        template = config.get("chat_template")
        jinja_file = d / "chat_template.jinja"
        if jinja_file.is_file():
            template = jinja_file.read_text()
        if isinstance(template, list):  # named templates: use "default"
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
            template = named.get("default")
        self.name = str(d)
        self._special = {k: t for k in ("bos_token", "eos_token", "unk_token", "pad_token")
                         if (t := _token_text(config.get(k))) is not None}
        self._template = _compile_template(template) if isinstance(template, str) else None

    def _encode(self, special: bool) -> Callable[[str], list[int]]:
        def encode(text: str) -> list[int]:
            ids: list[int] = self._tok.encode(text, add_special_tokens=special).ids
            return ids
        return encode

    def render(self, messages: Sequence[Any]) -> str | None:
        if self._template is None:
            return None
        msgs = []
        for m in messages:
            if not isinstance(m, Mapping):
                return None
            content = _string_content(m.get("content"))
            if content is None and m.get("content") is not None:
                return None
            msgs.append({**m, "content": content})
        try:
            text: str = self._template.render(messages=msgs, add_generation_prompt=True, **self._special)
        except Exception:
            return None
        return text

    def token_ids(self, body: Mapping[str, Any], chat: bool) -> list[int] | None:
        if chat and (body.get("tools") or body.get("documents") or body.get("chat_template")
                     or body.get("chat_template_kwargs") or body.get("add_generation_prompt") is False
                     or body.get("continue_final_message")):
            return None  # rendered differently by the server; not reproduced here
        ids = prompt_token_ids(body, chat, self._encode(not chat), self.render)
        return ids if isinstance(ids, list) else None


def _compile_template(source: str) -> Any:
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(jinja2.ext.Extension):
        """``{% generation %}...{% endgeneration %}`` renders its body (transformers marks assistant
        tokens with it)."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller: Callable[[], str]) -> str:
            return caller()

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateError as e:
        raise TokenizerError(f"chat template does not compile: {e}") from None


TOKENIZER_ENTRY_POINTS = "epp.tokenizers"


def load_tokenizer(spec: str) -> PromptTokenizer:
    """An installed tokenizer by name, or the path of a local tokenizer directory. Raises
    TokenizerError."""
    named = {ep.name: ep for ep in metadata.entry_points(group=TOKENIZER_ENTRY_POINTS)}
    ep = named.get(spec)
    if ep is not None:
        try:
            tokenizer: PromptTokenizer = ep.load()()
        except Exception as e:
            raise TokenizerError(f"tokenizer {spec!r} ({ep.value}) cannot be loaded: {type(e).__name__}: {e}") from None
        return tokenizer
    return HFPromptTokenizer(spec)
