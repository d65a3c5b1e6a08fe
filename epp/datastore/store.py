"""The datastore: the endpoint set, each endpoint's latest signals, and epp's own in-flight picks.

With active-active replicas the counters the scheduler reads (``inflight``, ``recent_picks``,
``inflight_tokens``) are this replica's own (``own_*``) plus the other replicas' latest (set by
``set_peer_load``); alone they are the same dicts.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace

from epp.datastore.endpoint import EndpointState, EngineSignals
from epp.datastore.peers import PeerTotals


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What one scheduling decision reads. Counters are live mappings, read-only to the scheduler."""

    endpoints: tuple[EndpointState, ...]
    inflight: dict[str, int]
    recent_picks: dict[str, int]
    now: float
    staleness: float
    inflight_tokens: dict[str, int] = field(default_factory=dict)  # prompt tokens not yet prefilled
    # When each endpoint's backlog of those tokens began computing, as far as epp knows: its first
    # dispatch to an empty backlog, or the last first bytes that left some (this replica's own).
    tokens_since: dict[str, float] = field(default_factory=dict)
    # Each endpoint's ``queued_and_loads`` values, kept current by the datastore as signals and
    # counters change (None: computed from the signals and counters per read).
    queued_by: dict[str, float] | None = None
    loads_by: dict[str, float] | None = None

    def queued(self, e: EndpointState) -> float:
        """Requests waiting on ``e`` (see ``queued_each``)."""
        return self.queued_each((e,))[0]

    def queued_each(self, endpoints: Iterable[EndpointState]) -> list[float]:
        """Requests waiting on each endpoint: the last scrape's queue plus epp's picks it could not
        show, those made since it, or, when more of epp's requests are in flight there than it
        showed running and waiting, the difference (picked before the scrape, not at the engine
        yet). One pass over the candidates (a call per candidate was 40% of a 1,000-pod pick)."""
        return self.queued_and_loads(endpoints)[0]

    def loads_each(self, endpoints: Iterable[EndpointState]) -> list[float]:
        """Each endpoint's load: max(epp's requests in flight there, its running + waiting) (what
        the hot-prefix spread compares, epp.scheduling.balance)."""
        return self.queued_and_loads(endpoints)[1]

    def queued_and_loads(self, endpoints: Iterable[EndpointState]) -> tuple[list[float], list[float]]:
        """``queued_each`` and ``loads_each`` in one pass over the endpoints (two lookups each when
        the datastore keeps them: computing them per pick was ~45% of a 1,000-candidate pick)."""
        queued_by, loads_by = self.queued_by, self.loads_by
        if queued_by is not None and loads_by is not None:
            endpoints = tuple(endpoints) if not isinstance(endpoints, (list, tuple)) else endpoints
            addresses = [e.address for e in endpoints]
            try:
                return list(map(queued_by.__getitem__, addresses)), list(map(loads_by.__getitem__, addresses))
            except KeyError:  # an endpoint the datastore does not hold
                pass
        return _queued_and_loads(endpoints, self.inflight, self.recent_picks)

    def fresh(self) -> tuple[EndpointState, ...]:
        """The endpoints whose metrics are fresh (what the scheduler chooses from, when any is)."""
        oldest = self.now - self.staleness  # (EndpointState.fresh, inlined: this runs per pick over the pool)
        return tuple([e for e in self.endpoints
                      if e.signals is not None and e.error is None and e.scraped_at >= oldest])


def _queued_and_loads(endpoints: Iterable[EndpointState], inflight: Mapping[str, int],
                      recent_picks: Mapping[str, int]) -> tuple[list[float], list[float]]:
    """Each endpoint's requests waiting (``Snapshot.queued_each``) and load (``loads_each``)."""
    inflight_of, recent_of = inflight.get, recent_picks.get
    rows = [queued_and_load(e.signals, inflight_of(e.address, 0), recent_of(e.address, 0)) for e in endpoints]
    return [q for q, _ in rows], [load for _, load in rows]


def queued_and_load(signals: EngineSignals | None, inflight: int, recent: int) -> tuple[float, float]:
    """One endpoint's (requests waiting, load), from its last scrape and epp's picks in flight
    there (``inflight``) and made since that scrape (``recent``)."""
    if recent > inflight:
        recent = inflight
    if signals is None:
        return float(recent), float(inflight)
    served = signals.running + signals.waiting
    unseen = inflight - served
    return signals.waiting + (recent if recent >= unseen else unseen), inflight if inflight > served else served


class Datastore:
    """Owns endpoints and counters; sources and the scraper write, the pick path reads."""

    def __init__(self, staleness: float = 2.0, clock: Callable[[], float] = time.monotonic,
                 refresh_interval: float = 0.05) -> None:
        self.staleness = staleness
        self.refresh_interval = refresh_interval  # how often the pods' metrics are scraped
        self._clock = clock
        self._states: dict[str, EndpointState] = {}
        self._tuple: tuple[EndpointState, ...] | None = ()  # None: rebuilt at the next read
        self.own_inflight: dict[str, int] = {}
        self.own_recent: dict[str, int] = {}
        self.own_tokens: dict[str, int] = {}
        self.tokens_since: dict[str, float] = {}
        self.inflight, self.recent_picks, self.inflight_tokens = self.own_inflight, self.own_recent, self.own_tokens
        self.total_picks: dict[str, int] = {}
        # Each endpoint's (requests waiting, load) the scheduler reads, redone as they change.
        self.queued_by: dict[str, float] = {}
        self.loads_by: dict[str, float] = {}
        self._peers: PeerTotals | None = None
        self._listeners: list[Callable[[set[str], set[str]], None]] = []

    # -- endpoint set ---------------------------------------------------------------------------
    def on_change(self, listener: Callable[[set[str], set[str]], None]) -> None:
        """Call ``listener(added, removed)`` whenever the endpoint set changes."""
        self._listeners.append(listener)

    def set_endpoints(self, addresses: Iterable[str], labels: Mapping[str, Mapping[str, str]] | None = None,
                      names: Mapping[str, str] | None = None) -> None:
        """The endpoint set, and each endpoint's labels and name (its pod's, with discovery)."""
        wanted = dict.fromkeys(addresses)
        arriving = [a for a in wanted if a not in self._states]  # in the order given: the candidates' order
        added = set(arriving)
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
            for counts in (self.own_inflight, self.own_recent, self.own_tokens, self.total_picks, self.inflight,
                           self.recent_picks, self.inflight_tokens, self.queued_by, self.loads_by):
                counts.pop(a, None)
            self.tokens_since.pop(a, None)
        for a in arriving:
            self._states[a] = EndpointState(a, labels=dict(labels.get(a, {})) if labels is not None else {},
                                            name=names.get(a, "") if names is not None else "")
            self.own_inflight.setdefault(a, 0)
            self.own_recent.setdefault(a, 0)
            self.total_picks.setdefault(a, 0)
            if self._peers is not None:
                self._merge(a)
            self._rerow(a)
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
        self.own_recent[address] = self.total_picks.get(address, 0) - picks_at_start
        if self._peers is not None:
            self._merge(address)
        self._rerow(address)

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
            self.own_inflight[address] = self.own_inflight.get(address, 0) + 1
            self.own_recent[address] = self.own_recent.get(address, 0) + 1
            self.total_picks[address] = self.total_picks.get(address, 0) + 1
            if tokens:
                if not self.own_tokens.get(address):
                    self.tokens_since[address] = self._clock()
                self.own_tokens[address] = self.own_tokens.get(address, 0) + tokens
            if self._peers is not None:
                self._merge(address)
            self._rerow(address)

    def prefilled(self, address: str, tokens: int) -> None:
        """``tokens`` acquired on ``address`` are prefilled (the response started, or ended)."""
        n = self.own_tokens.get(address)
        if n is not None and tokens:
            left = n - tokens
            if left > 0:
                self.own_tokens[address] = left
                self.tokens_since[address] = self._clock()
            else:
                del self.own_tokens[address]
                self.tokens_since.pop(address, None)
            if self._peers is not None:
                self._merge(address)

    def release(self, address: str) -> None:
        n = self.own_inflight.get(address)
        if n:
            self.own_inflight[address] = n - 1
            if self._peers is not None:
                self._merge(address)
            self._rerow(address)

    # -- other replicas ----------------------------------------------------------------------------------
    def set_peer_load(self, peers: PeerTotals | None) -> None:
        """The other replicas' load (None: there is none, or it is no longer known): the counters
        the scheduler reads become this replica's own plus theirs."""
        if peers is None or not peers.replicas:
            self._peers = None
            self.inflight, self.recent_picks, self.inflight_tokens = \
                self.own_inflight, self.own_recent, self.own_tokens
            for a in self._states:
                self._rerow(a)
            return
        if self._peers is None:
            self.inflight, self.recent_picks, self.inflight_tokens = {}, {}, {}
        self._peers = peers
        for a in self._states:
            self._merge(a)
            self._rerow(a)

    def _merge(self, a: str) -> None:
        p = self._peers
        assert p is not None
        self.inflight[a] = self.own_inflight.get(a, 0) + p.inflight.get(a, 0)
        self.recent_picks[a] = self.own_recent.get(a, 0) + p.recent.get(a, 0)
        tokens = self.own_tokens.get(a, 0) + p.tokens.get(a, 0)
        if tokens > 0:
            self.inflight_tokens[a] = tokens
        else:
            self.inflight_tokens.pop(a, None)

    def _rerow(self, a: str) -> None:
        state = self._states.get(a)
        if state is not None:
            self.queued_by[a], self.loads_by[a] = queued_and_load(
                state.signals, self.inflight.get(a, 0), self.recent_picks.get(a, 0))

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
                        self.inflight_tokens, self.tokens_since, self.queued_by, self.loads_by)

    def fresh_count(self) -> int:
        now = self._clock()
        return sum(1 for s in self._endpoints() if s.fresh(now, self.staleness))
