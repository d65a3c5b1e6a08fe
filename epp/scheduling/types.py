"""Types shared by the scheduler and its plugins."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from epp.datastore.endpoint import EndpointState
from epp.datastore.store import Snapshot
from epp.request import InferenceRequest


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


@dataclass(slots=True)
class CycleState:
    """Per-decision scratch space shared by the plugins of one scheduling cycle."""

    data: dict[str, Any] = field(default_factory=dict)


class Scorer(Protocol):
    type_name: ClassVar[str]
    name: str

    def score(self, request: InferenceRequest, snapshot: Snapshot, candidates: list[EndpointState],
              cycle: CycleState) -> list[float]: ...


class Picker(Protocol):
    type_name: ClassVar[str]
    name: str
    max_endpoints: int

    def pick(self, candidates: list[EndpointState], totals: list[float]) -> list[int]: ...


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

    @property
    def primary(self) -> str:
        return self.endpoints[0]

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
