"""The datastore: the endpoint set, each endpoint's latest signals, and epp's own in-flight picks."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace

from epp.datastore.endpoint import EndpointState, EngineSignals


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What one scheduling decision reads. Counters are live mappings, read-only to the scheduler."""

    endpoints: tuple[EndpointState, ...]
    inflight: dict[str, int]
    recent_picks: dict[str, int]
    now: float
    staleness: float
    inflight_tokens: dict[str, int] = field(default_factory=dict)  # prompt tokens not yet prefilled

    def fresh(self) -> tuple[EndpointState, ...]:
        """The endpoints whose metrics are fresh (what the scheduler chooses from, when any is)."""
        oldest = self.now - self.staleness  # (EndpointState.fresh, inlined: this runs per pick over the pool)
        return tuple(e for e in self.endpoints if e.signals is not None and e.error is None and e.scraped_at >= oldest)


class Datastore:
    """Owns endpoints and counters; sources and the scraper write, the pick path reads."""

    def __init__(self, staleness: float = 2.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.staleness = staleness
        self._clock = clock
        self._states: dict[str, EndpointState] = {}
        self._tuple: tuple[EndpointState, ...] | None = ()  # None: rebuilt at the next read
        self.inflight: dict[str, int] = {}
        self.recent_picks: dict[str, int] = {}
        self.total_picks: dict[str, int] = {}
        self.inflight_tokens: dict[str, int] = {}
        self._listeners: list[Callable[[set[str], set[str]], None]] = []

    # -- endpoint set ---------------------------------------------------------------------------
    def on_change(self, listener: Callable[[set[str], set[str]], None]) -> None:
        """Call ``listener(added, removed)`` whenever the endpoint set changes."""
        self._listeners.append(listener)

    def set_endpoints(self, addresses: Iterable[str], labels: Mapping[str, Mapping[str, str]] | None = None,
                      names: Mapping[str, str] | None = None) -> None:
        """The endpoint set, and each endpoint's labels and name (its pod's, with discovery)."""
        wanted = dict.fromkeys(addresses)
        added = {a for a in wanted if a not in self._states}
        removed = {a for a in self._states if a not in wanted}
        relabelled = False
        if labels is not None or names is not None:
            for a in wanted:
                state = self._states.get(a)
                if state is None:
                    continue
                new = dict(labels.get(a, {})) if labels is not None else state.labels
                name = names.get(a, "") if names is not None else state.name
                if state.labels != new or state.name != name:
                    self._states[a] = replace(state, labels=new, name=name)
                    relabelled = True
        if relabelled and not added and not removed:
            self._tuple = None
        if not added and not removed:
            return
        for a in removed:
            del self._states[a]
            self.inflight.pop(a, None)
            self.recent_picks.pop(a, None)
            self.total_picks.pop(a, None)
            self.inflight_tokens.pop(a, None)
        for a in added:
            self._states[a] = EndpointState(a, labels=dict(labels.get(a, {})) if labels is not None else {},
                                            name=names.get(a, "") if names is not None else "")
            self.inflight.setdefault(a, 0)
            self.recent_picks.setdefault(a, 0)
            self.total_picks.setdefault(a, 0)
        self._tuple = None
        for listener in self._listeners:
            listener(added, removed)

    def addresses(self) -> list[str]:
        return list(self._states)

    def get(self, address: str) -> EndpointState | None:
        return self._states.get(address)

    # -- signals ------------------------------------------------------------------------------------
    def record_scrape(self, address: str, signals: EngineSignals, picks_at_start: int) -> None:
        state = self._states.get(address)
        if state is None:
            return
        self._states[address] = replace(state, signals=signals, scraped_at=self._clock(), error=None)
        self._tuple = None
        # Picks made after the scrape started are not in its numbers yet.
        self.recent_picks[address] = self.total_picks.get(address, 0) - picks_at_start

    def record_attributes(self, address: str, values: Mapping[str, float]) -> None:
        """An attribute source's latest values for ``address`` (they replace its earlier ones)."""
        state = self._states.get(address)
        if state is None or state.attributes == values:
            return
        self._states[address] = replace(state, attributes=dict(values))
        self._tuple = None

    def record_scrape_error(self, address: str, error: str) -> None:
        state = self._states.get(address)
        if state is None:
            return
        self._states[address] = replace(state, error=error)
        self._tuple = None

    # -- picks -----------------------------------------------------------------------------------------
    def acquire(self, address: str, tokens: int = 0) -> None:
        """One more request in flight on ``address``, with ``tokens`` prompt tokens to prefill."""
        if address in self._states:
            self.inflight[address] = self.inflight.get(address, 0) + 1
            self.recent_picks[address] = self.recent_picks.get(address, 0) + 1
            self.total_picks[address] = self.total_picks.get(address, 0) + 1
            if tokens:
                self.inflight_tokens[address] = self.inflight_tokens.get(address, 0) + tokens

    def prefilled(self, address: str, tokens: int) -> None:
        """``tokens`` acquired on ``address`` are prefilled (the response started, or ended)."""
        n = self.inflight_tokens.get(address)
        if n is not None and tokens:
            left = n - tokens
            if left > 0:
                self.inflight_tokens[address] = left
            else:
                del self.inflight_tokens[address]

    def release(self, address: str) -> None:
        n = self.inflight.get(address)
        if n:
            self.inflight[address] = n - 1

    # -- reading -----------------------------------------------------------------------------------------
    def served_models(self) -> set[str]:
        """The model names the endpoints' metrics report."""
        return {m for st in self._states.values() if st.signals is not None for m in st.signals.models}

    def _endpoints(self) -> tuple[EndpointState, ...]:
        """The endpoints as a tuple, rebuilt only when read after a change: a scrape replaces one
        endpoint's state, and rebuilding on every scrape would cost O(pool) per scrape."""
        t = self._tuple
        if t is None:
            t = self._tuple = tuple(self._states.values())
        return t

    def snapshot(self) -> Snapshot:
        return Snapshot(self._endpoints(), self.inflight, self.recent_picks, self._clock(), self.staleness,
                        self.inflight_tokens)

    def fresh_count(self) -> int:
        now = self._clock()
        return sum(1 for s in self._endpoints() if s.fresh(now, self.staleness))
