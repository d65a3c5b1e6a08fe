"""A deterministic tokenizer and chat template for the simulator.

Text is cut into pieces of at most four non-space characters (a leading space belongs to the
piece), roughly the 4 characters per token of real BPE vocabularies. A piece's id is its crc32
modulo the vocabulary size, so the same text always gives the same ids, and the same prefix the
same leading ids. Generated text is drawn from pieces that re-tokenize to themselves, so a
multi-turn chat that sends back the assistant's answer hits the cache the way real engines do.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Iterable, Mapping
from typing import Any

from epp.tokenization import prompt_token_ids

VOCAB_SIZE = 32000
_PIECE = re.compile(r" ?[^\s]{1,4}|\s+")
_SYLLABLES = ("ka", "lo", "mi", "ne", "ru", "sa", "te", "vo", "zi", "pa", "do", "fu")
# Words that each re-tokenize to exactly one piece: " " + 2..4 letters.
OUTPUT_WORDS: tuple[str, ...] = tuple(
    " " + a + b[: 1 + (i % 2)] for i, (a, b) in enumerate((a, b) for a in _SYLLABLES for b in _SYLLABLES)
)


def _piece_id(piece: str) -> int:
    return zlib.crc32(piece.encode("utf-8", "surrogatepass")) % VOCAB_SIZE


class _PieceIds(dict[str, int]):
    """piece -> id, computed on first use (the lookup loop then runs in C)."""

    def __missing__(self, piece: str) -> int:
        tid = self[piece] = _piece_id(piece)
        return tid


MAX_CACHED_PIECES = 500_000


class SimTokenizer:
    """Text <-> token ids; ids of generated pieces map back to their text."""

    def __init__(self) -> None:
        self._output_ids = [_piece_id(w) for w in OUTPUT_WORDS]
        self._text_of = {tid: w for tid, w in zip(self._output_ids, OUTPUT_WORDS, strict=True)}
        self._ids = _PieceIds()

    def encode(self, text: str) -> list[int]:
        if len(self._ids) > MAX_CACHED_PIECES:
            self._ids.clear()
        return list(map(self._ids.__getitem__, _PIECE.findall(text)))

    def output_token(self, n: int) -> int:
        """The id of the n-th word of the generation alphabet."""
        return self._output_ids[n % len(self._output_ids)]

    def decode_one(self, token_id: int) -> str:
        return self._text_of.get(token_id, " ?")

    def decode(self, token_ids: Iterable[int]) -> str:
        return "".join(self.decode_one(t) for t in token_ids)


def message_text(content: Any) -> str:
    """The text of a chat message's content (a string or a list of typed parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def render_chat(messages: Iterable[Mapping[str, Any]], add_generation_prompt: bool = True) -> str:
    """ChatML, the template the tiny test model and many open models use."""
    parts = [f"<|im_start|>{m.get('role', 'user')}\n{message_text(m.get('content'))}<|im_end|>\n" for m in messages]
    if add_generation_prompt:
        parts.append("<|im_start|>assistant\n")
    return "".join(parts)


class SimPromptTokenizer:
    """The simulator's tokenizer and ChatML template, as the precise scorer's ``tokenizer: sim``
    (registered in the ``epp.tokenizers`` entry-point group)."""

    name = "sim"

    def __init__(self) -> None:
        self._tok = SimTokenizer()

    def token_ids(self, body: Mapping[str, Any], chat: bool) -> list[int] | None:
        ids = prompt_token_ids(body, chat, self._tok.encode, render_chat)
        return ids if isinstance(ids, list) else None
