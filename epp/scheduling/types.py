"""Values the scheduler and its plugins exchange: cycle state, decisions, errors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from epp.datastore.endpoint import EndpointState

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration error with the path of the offending field."""

    def __init__(self, path: str, message: str) -> None:
        message = " ".join(message.split())  # always one line (YAML errors span several)
        super().__init__(f"{path}: {message}")
        self.path = path
        self.message = message


class SchedulingError(Exception):
    """No endpoint can take the request: HTTP ``status`` (503 none usable, 429 saturated)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Slot(Generic[T]):
    """A named, typed value of one cycle: a producer ``put``s it, consumers ``get`` it.

    A plugin's private state across the hooks of one request is a slot it owns; values shared
    between plugins are the module-level slots below, declared by the plugins that produce and
    consume them (``Plugin.produces`` / ``Plugin.consumes``), which also orders the scorers."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"Slot({self.name!r})"


class CycleState:
    """Per-decision values shared by the plugins of one scheduling cycle, by slot."""

    __slots__ = ("_values",)

    def __init__(self) -> None:
        self._values: dict[Slot[Any], Any] = {}

    def put(self, slot: Slot[T], value: T) -> None:
        self._values[slot] = value

    def get(self, slot: Slot[T]) -> T | None:
        value: T | None = self._values.get(slot)
        return value

    def pop(self, slot: Slot[T]) -> T | None:
        value: T | None = self._values.pop(slot, None)
        return value


# Shared slots. Prefix scorers produce both; the prefill-load scorer consumes them.
MATCHED_TOKENS: Slot[dict[str, int]] = Slot("prefix-matched-tokens")  # pod -> prompt tokens cached there
PROMPT_TOKENS: Slot[int] = Slot("prompt-tokens")  # the prompt's exact token count, when tokenized
# Per candidate, in the cycle's candidate order: max(epp's in-flight there, running + waiting). The
# queue scorer produces it with the queues (one pass); the prefix scorers' hot-prefix spread reads it.
CANDIDATE_LOADS: Slot[list[float]] = Slot("candidate-loads")
CHARS_PER_TOKEN = 4  # the estimate of a prompt's tokens where it was not tokenized


def prompt_tokens(cycle: CycleState, prompt: str) -> int:
    """The prompt's tokens: exact when a plugin tokenized it this cycle, else estimated."""
    return cycle.get(PROMPT_TOKENS) or len(prompt) // CHARS_PER_TOKEN


@dataclass(frozen=True, slots=True)
class Usage:
    """What a response reported it used (OpenAI ``usage``)."""

    prompt_tokens: int
    cached_tokens: int | None
    completion_tokens: int


@dataclass(frozen=True, slots=True)
class Completion:
    """How a response ended: its usage (None when epp could not read it), whether its body
    came in pieces, the first before the end (a stream epp saw stream; not a buffered body), and
    whether its status was a success (200, or none known)."""

    usage: Usage | None
    streamed: bool
    ok: bool = True


@dataclass(frozen=True, slots=True)
class PrefixMatch:
    """One request against the index: its block hashes, and each candidate's leading matches."""

    hashes: list[int]
    blocks: dict[str, int]  # endpoint -> leading blocks it holds
    block_tokens: int

    @property
    def total(self) -> int:
        return len(self.hashes)


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of one scheduling cycle; explanations are computed only when asked for."""

    endpoints: tuple[str, ...]
    profile: str
    candidates: list[EndpointState]
    scorer_names: tuple[str, ...]
    weights: tuple[float, ...]
    raw_scores: list[list[float]]  # per scorer, per candidate
    totals: list[float]
    cycle: CycleState
    note: str = ""
    # Where the gateway sends the request when a profile handler reshapes it (else ``endpoints``),
    # and the headers it sets on the request to the server.
    destinations: tuple[str, ...] = ()
    request_headers: tuple[tuple[str, str], ...] = ()
    prefill: Decision | None = None  # P/D: the prefill stage's decision (its pod computes the prompt)

    @property
    def primary(self) -> str:
        return self.endpoints[0]

    @property
    def targets(self) -> tuple[str, ...]:
        """The addresses the gateway is given, primary first."""
        return self.destinations or self.endpoints

    def scores(self) -> dict[str, tuple[float, dict[str, float]]]:
        """address -> (weighted total, {scorer: raw score in [0, 1]})."""
        return {
            c.address: (self.totals[i], {n: s[i] for n, s in zip(self.scorer_names, self.raw_scores, strict=True)})
            for i, c in enumerate(self.candidates)
        }

    def reason(self) -> str:
        """One line: why the primary won, e.g. 'prefix-cache-scorer=1.00 queue-scorer=0.50 -> 4.00'."""
        idx = next(i for i, c in enumerate(self.candidates) if c.address == self.primary)
        parts = [f"{n}={s[idx]:.2f}" for n, s in zip(self.scorer_names, self.raw_scores, strict=True)]
        text = f"{' '.join(parts)} total={self.totals[idx]:.2f} of {len(self.candidates)} candidates"
        others = sorted((t for i, t in enumerate(self.totals) if i != idx), reverse=True)
        if others:
            text += f" (next {others[0]:.2f})"
        if self.note:
            text += f"; {self.note}"
        return text
