"""Counters, gauges and histograms that only the event loop updates.

prometheus_client guards every value with a lock and finds a histogram's bucket in a Python loop:
~0.7 us per update, a dozen updates per request. These keep its classes (registration, labels,
exposition, ``_created``) and swap the value for a bare float: one thread writes, and the metrics
renderer (another thread) only reads whole floats, which the interpreter reads atomically. A
histogram's bucket is found by bisection. Use them for series updated on the event loop only.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from typing import Any

from prometheus_client import Counter, Gauge, Histogram


class LoopValue:
    """A float without a lock (the ``values.ValueClass`` interface prometheus_client reads)."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float) -> None:
        self.value += amount

    def set(self, value: float, timestamp: float | None = None) -> None:
        self.value = value

    def get(self) -> float:
        return self.value

    def set_exemplar(self, exemplar: Any) -> None:
        raise ValueError("loop-owned metrics keep no exemplars")

    def get_exemplar(self) -> None:
        return None


class LoopCounter(Counter):
    """A ``Counter`` whose children the event loop alone increments."""

    def _metric_init(self) -> None:
        self._value: LoopValue = LoopValue()
        self._created = time.time()

    def inc(self, amount: float = 1, exemplar: dict[str, str] | None = None) -> None:
        if amount < 0 or exemplar:
            raise ValueError("a counter only goes up, and loop-owned counters keep no exemplars")
        self._value.value += amount


class LoopGauge(Gauge):
    """A ``Gauge`` whose children the event loop alone moves."""

    def _metric_init(self) -> None:
        self._value: LoopValue = LoopValue()

    def inc(self, amount: float = 1) -> None:
        self._value.value += amount

    def dec(self, amount: float = 1) -> None:
        self._value.value -= amount

    def set(self, value: float) -> None:
        self._value.value = float(value)


class LoopHistogram(Histogram):
    """A ``Histogram`` whose children the event loop alone observes."""

    def _metric_init(self) -> None:
        self._created = time.time()
        self._sum: LoopValue = LoopValue()
        self._buckets: list[LoopValue] = [LoopValue() for _ in self._upper_bounds]
        self._bounds = tuple(self._upper_bounds)

    def observe(self, amount: float, exemplar: dict[str, str] | None = None) -> None:
        if exemplar or amount != amount:
            raise ValueError("loop-owned histograms keep no exemplars and observe numbers, not NaN")
        self._sum.value += amount
        self._buckets[bisect_left(self._bounds, amount)].value += 1  # the first bound >= amount
