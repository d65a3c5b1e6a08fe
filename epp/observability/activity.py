"""What the dashboard shows beyond the datastore: the last decisions and each pod's reported cache hits.

The director tells it every pick (``picked``: kept as the Decision itself, formatted only when
the dashboard reads it) and every response's usage (``served``). Bounded: the last ``keep``
decisions; token sums per endpoint of the pool (dropped with the endpoint).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from epp.scheduling.types import Decision


@dataclass(slots=True)
class CacheHits:
    prompt_tokens: int = 0
    cached_tokens: int = 0

    @property
    def rate(self) -> float | None:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else None


class Activity:
    def __init__(self, keep: int = 40) -> None:
        self._recent: deque[tuple[float, str, Decision, tuple[tuple[str, str], ...]]] = deque(maxlen=keep)
        self.hits: dict[str, CacheHits] = {}

    def picked(self, model: str, decision: Decision, shadows: tuple[tuple[str, str], ...] = ()) -> None:
        """A live pick, with where each sampled shadow config would have sent it ((config, pod)...)."""
        self._recent.append((time.time(), model, decision, shadows))

    def served(self, endpoint: str, prompt_tokens: int, cached_tokens: int | None) -> None:
        """A response's usage: ``prompt_tokens`` of which ``cached_tokens`` came from the pod's cache."""
        if prompt_tokens and cached_tokens is not None:
            h = self.hits.get(endpoint)
            if h is None:
                h = self.hits[endpoint] = CacheHits()
            h.prompt_tokens += prompt_tokens
            h.cached_tokens += cached_tokens

    def forget(self, endpoint: str) -> None:
        self.hits.pop(endpoint, None)

    def decisions(self, limit: int = 20) -> list[dict[str, Any]]:
        """The last ``limit`` decisions, newest first, as the dashboard shows them."""
        newest = list(self._recent)[-limit:][::-1]
        return [{"time": t, "model": model, "endpoint": d.primary, "fallbacks": list(d.endpoints[1:]),
                 "reason": d.reason(), "shadow": [{"config": c, "endpoint": e} for c, e in shadows]}
                for t, model, d, shadows in newest]
