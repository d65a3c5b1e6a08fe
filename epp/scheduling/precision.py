"""Does the precise index predict what the pods actually cached? (the closed loop)

Every response reports ``usage.prompt_tokens_details.cached_tokens``. Compared with the tokens
the index predicted would be cached on the chosen pod, a window of recent requests gives the
routing precision: sum(min(predicted, actual)) / sum(max(predicted, actual)). It is 1 when the
index is right, and falls when it claims blocks the pod does not have (lost events, evictions it
did not hear of) or misses blocks the pod has (a tokenizer, block-size or hash-seed mismatch).
Below ``min_precision`` the pool routes on the approximate index; at ``recover_precision`` it
goes back. Requests where neither side expected or found a cached token carry no evidence.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass


@dataclass(slots=True)
class PrecisionTotals:
    samples: int = 0
    predicted_tokens: int = 0
    actual_tokens: int = 0
    agreed_tokens: int = 0
    fallbacks: int = 0
    recoveries: int = 0


class PrecisionTracker:
    def __init__(self, window: int = 64, min_samples: int = 16, min_precision: float = 0.5,
                 recover_precision: float = 0.7) -> None:
        self.window: deque[tuple[int, int]] = deque(maxlen=window)
        self.min_samples = min_samples
        self.min_precision = min_precision
        self.recover_precision = max(recover_precision, min_precision)
        self.trusted = True
        self.totals = PrecisionTotals()
        self._agreed = 0
        self._union = 0

    @property
    def precision(self) -> float | None:
        """Over the window; None until there is evidence."""
        return self._agreed / self._union if self._union else None

    def add(self, predicted: int, actual: int) -> str | None:
        """Record one response; returns a message when the trust in the index changes."""
        t = self.totals
        t.samples += 1
        t.predicted_tokens += predicted
        t.actual_tokens += actual
        t.agreed_tokens += min(predicted, actual)
        if predicted == 0 and actual == 0:
            return None
        if len(self.window) == self.window.maxlen:
            old_p, old_a = self.window[0]
            self._agreed -= min(old_p, old_a)
            self._union -= max(old_p, old_a)
        self.window.append((predicted, actual))
        self._agreed += min(predicted, actual)
        self._union += max(predicted, actual)
        if len(self.window) < self.min_samples:
            return None
        p = self._agreed / self._union
        if self.trusted and p < self.min_precision:
            self.trusted = False
            t.fallbacks += 1
            return (f"precision {p:.2f} over the last {len(self.window)} responses is below {self.min_precision}: "
                    "routing on the approximate index")
        if not self.trusted and p >= self.recover_precision:
            self.trusted = True
            t.recoveries += 1
            return f"precision recovered to {p:.2f}: routing on the precise index again"
        return None
