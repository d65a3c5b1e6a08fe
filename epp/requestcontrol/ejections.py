"""What the gateway's retries say about each model server: the picker's view of the circuit breaker.

Envoy tries the picker's endpoints in order and reports which one served
(``x-gateway-destination-endpoint-served``). Every endpoint tried before it failed; the one that
served failed too when its answer is a 5xx. ``consecutive`` failures in a row (the same count as
Envoy's outlier detection) take an endpoint out of the picker's candidates for ``duration``, so
the picker stops choosing a server Envoy has ejected; a success resets its count. When every
endpoint is out, none is (a guess beats a refusal).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field


@dataclass(slots=True)
class Ejections:
    consecutive: int = 5
    duration: float = 30.0
    clock: Callable[[], float] = field(default=lambda: 0.0)
    failures: dict[str, int] = field(default_factory=dict)
    until: dict[str, float] = field(default_factory=dict)  # ejected endpoint -> when it may be picked again
    ejected_total: dict[str, int] = field(default_factory=dict)

    def outcome(self, tried: Sequence[str], served: str, status: int) -> None:
        """One request's attempts: ``tried`` (in order, ending where it was served) and the final status."""
        for address in tried:
            if address != served:
                self._failed(address)
        if status >= 500:
            self._failed(served)
        elif served:
            self.failures.pop(served, None)

    def _failed(self, address: str) -> None:
        n = self.failures.get(address, 0) + 1
        if n >= self.consecutive:
            self.failures.pop(address, None)
            self.until[address] = self.clock() + self.duration
            self.ejected_total[address] = self.ejected_total.get(address, 0) + 1
        else:
            self.failures[address] = n

    def excluded(self) -> frozenset[str]:
        """The endpoints out of the picker's candidates now."""
        if not self.until:
            return frozenset()
        now = self.clock()
        for address in [a for a, t in self.until.items() if t <= now]:
            del self.until[address]
        return frozenset(self.until)

    def forget(self, address: str) -> None:
        """The endpoint left the pool."""
        self.failures.pop(address, None)
        self.until.pop(address, None)
