"""Read the usage (``prompt_tokens_details.cached_tokens``, ``prompt_tokens``,
``completion_tokens``) from a response as it streams through.

JSON responses and SSE streams both carry usage at the end, so the reader keeps only the last
few KB it saw. When epp itself asked for usage (it added ``stream_options.include_usage`` to a
stream whose client did not), the reader also removes that usage event, the one vLLM sends with
``"choices":[]``, so the client receives exactly what it asked for. Only whole events are cut;
bytes pass through as they arrive, except an incomplete trailing event, held until its end
(vLLM writes whole events, so in practice nothing waits).
"""

from __future__ import annotations

import re

import orjson

from epp.request import InferenceRequest

TAIL = 8192
HOLD_LIMIT = 1 << 20  # never hold more than this waiting for an event's end
_CACHED = re.compile(rb'"cached_tokens"\s*:\s*(\d+)')
_PROMPT = re.compile(rb'"prompt_tokens"\s*:\s*(\d+)')
_COMPLETION = re.compile(rb'"completion_tokens"\s*:\s*(\d+)')


def wants_injection(request: InferenceRequest) -> bool:
    """A stream whose client did not ask for usage: epp must add (and later strip) it."""
    body = request.body
    if body is None or body.get("stream") is not True:
        return False
    opts = body.get("stream_options")
    return not (isinstance(opts, dict) and opts.get("include_usage") is True)


def _is_injected_usage(event: bytes) -> tuple[bool, int | None]:
    """(is this the usage-only event, its cached tokens)."""
    for line in event.split(b"\n"):
        if line.startswith(b"data:"):
            try:
                data = orjson.loads(line[5:])
            except orjson.JSONDecodeError:
                return False, None
            if isinstance(data, dict) and data.get("choices") == [] and isinstance(data.get("usage"), dict):
                details = data["usage"].get("prompt_tokens_details")
                cached = details.get("cached_tokens") if isinstance(details, dict) else None
                return True, cached if isinstance(cached, int) else None
            return False, None
    return False, None


class UsageReader:
    __slots__ = ("_held", "_tail", "cached_tokens", "completion_tokens", "prompt_tokens", "strip", "stripped")

    def __init__(self, strip: bool) -> None:
        self.strip = strip
        self.stripped = False
        self.cached_tokens: int | None = None
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self._tail = b""
        self._held = b""

    def feed(self, data: bytes, eos: bool) -> bytes:
        """Take one response body chunk; returns the bytes to forward now."""
        if not self.strip:
            self._keep_tail(data)
            if eos:
                self._read_tail()
            return data
        buf = self._held + data if self._held else data
        if eos:
            self._held = b""
            out = self._filter(buf)
            self._read_tail()
            return out
        cut = buf.rfind(b"\n\n")
        if cut < 0 and len(buf) < HOLD_LIMIT:
            self._held = buf
            return b""
        end = len(buf) if cut < 0 else cut + 2
        self._held = buf[end:]
        return self._filter(buf[:end] if end < len(buf) else buf)

    def _filter(self, buf: bytes) -> bytes:
        self._keep_tail(buf)
        if self.stripped or b'"usage"' not in buf:
            return buf
        events = buf.split(b"\n\n")
        kept = []
        for i, ev in enumerate(events):
            if b'"usage"' in ev:
                usage_only, cached = _is_injected_usage(ev)
                if usage_only:
                    self.stripped = True
                    self.cached_tokens = cached
                    continue
            kept.append(ev if i == len(events) - 1 else ev + b"\n\n")
        return b"".join(kept)

    def _keep_tail(self, data: bytes) -> None:
        if len(data) >= TAIL:
            self._tail = data[-TAIL:]
        else:
            self._tail = (self._tail + data)[-TAIL:]

    def _read_tail(self) -> None:
        tail = self._tail
        found = _CACHED.findall(tail)
        if found and self.cached_tokens is None:
            self.cached_tokens = int(found[-1])
        prompt, completion = _PROMPT.findall(tail), _COMPLETION.findall(tail)
        if prompt:
            self.prompt_tokens = int(prompt[-1])
        if completion:
            self.completion_tokens = int(completion[-1])
