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
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric


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


def closed_loop_families(pool: str, plugin: str, tracker: PrecisionTracker, active: bool,
                         index_blocks: int) -> Iterator[Metric]:
    """The closed loop's series of a precise plugin (the scorer's or the producer's): agreement,
    whether the precise index routes, the token totals, the fallbacks, and the index's size."""
    labels, values = ["name", "plugin"], [pool, plugin]
    totals = tracker.totals
    rows: list[tuple[type[Any], str, str, float | None]] = [
        (GaugeMetricFamily, "epp_prefix_routing_precision",
         "Agreement of predicted and reported cached prompt tokens over recent responses "
         "(sum of min / sum of max; 1 = the precise index is exact).", tracker.precision),
        (GaugeMetricFamily, "epp_prefix_routing_precise_active",
         "1 while the precise index routes, 0 while fallen back to the approximate one.", 1.0 if active else 0.0),
        (CounterMetricFamily, "epp_prefix_predicted_cached_tokens",
         "Prompt tokens the precise index predicted cached on the chosen pod.", totals.predicted_tokens),
        (CounterMetricFamily, "epp_prefix_reported_cached_tokens",
         "Prompt tokens the pods reported served from cache (usage.cached_tokens).", totals.actual_tokens),
        (CounterMetricFamily, "epp_prefix_routing_fallbacks", "Switches to the approximate index.", totals.fallbacks),
        (GaugeMetricFamily, "epp_precise_index_blocks", "Blocks held by the precise index (all pods).", index_blocks),
    ]
    for family, name, help_text, value in rows:
        fam = family(name, help_text, labels=labels)
        if value is not None:
            fam.add_metric(values, value)
        yield fam
