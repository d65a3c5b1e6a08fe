"""What active-active replicas tell each other of the state only a picker knows.

Each replica publishes its own load (per endpoint: requests in flight, prompt tokens not yet
prefilled, picks since that endpoint's last scrape; and its waiting room's size) under its id,
with a sequence number that moves on every publication. ``PeerLoads`` keeps the others' latest
and drops a replica whose number has not moved for ``staleness`` seconds of this replica's own
clock (so clocks need not agree across machines); one no longer listed has left. Sans-I/O: the
store's client lives at the edge (epp.server.sharedstate).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import orjson


class PeerFormatError(ValueError):
    """A published load that is not one (another version, or not epp's)."""


@dataclass(frozen=True, slots=True)
class ReplicaLoad:
    """One replica's own load, as it publishes it."""

    replica: str
    seq: int
    inflight: Mapping[str, int] = field(default_factory=dict)
    tokens: Mapping[str, int] = field(default_factory=dict)
    recent: Mapping[str, int] = field(default_factory=dict)
    queued: int = 0  # requests in its waiting room
    queued_bytes: int = 0

    def encode(self) -> bytes:
        return orjson.dumps({"v": 1, "r": self.replica, "s": self.seq, "i": self.inflight, "t": self.tokens,
                             "p": self.recent, "q": self.queued, "b": self.queued_bytes})

    @staticmethod
    def decode(raw: bytes) -> ReplicaLoad:
        try:
            d = orjson.loads(raw)
        except orjson.JSONDecodeError as e:
            raise PeerFormatError(f"not JSON: {e}") from None
        if not isinstance(d, dict) or d.get("v") != 1:
            raise PeerFormatError("not a version-1 replica load")
        try:
            return ReplicaLoad(str(d["r"]), int(d["s"]), _counts(d["i"]), _counts(d["t"]), _counts(d["p"]),
                               int(d["q"]), int(d["b"]))
        except (KeyError, TypeError, ValueError) as e:
            raise PeerFormatError(f"bad replica load: {e!r}") from None


def _counts(value: object) -> dict[str, int]:
    if not isinstance(value, dict):
        raise TypeError("counts must be an object")
    return {str(k): int(v) for k, v in value.items() if v}


@dataclass(frozen=True, slots=True)
class PeerTotals:
    """The other replicas' loads summed."""

    inflight: dict[str, int] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)
    recent: dict[str, int] = field(default_factory=dict)
    queued: int = 0
    queued_bytes: int = 0
    replicas: int = 0


def _add(into: dict[str, int], counts: Mapping[str, int]) -> None:
    for k, v in counts.items():
        into[k] = into.get(k, 0) + v


class PeerLoads:
    """The other replicas' latest loads; a replica silent for ``staleness`` seconds is dropped."""

    def __init__(self, me: str, staleness: float) -> None:
        self.me = me
        self.staleness = staleness
        self._latest: dict[str, ReplicaLoad] = {}
        self._moved_at: dict[str, float] = {}

    def update(self, loads: Iterable[ReplicaLoad], now: float) -> None:
        """Every replica's latest, as the store lists them: one not listed has left."""
        listed = set()
        for load in loads:
            if load.replica == self.me:
                continue
            listed.add(load.replica)
            seen = self._latest.get(load.replica)
            if seen is None or seen.seq != load.seq:
                self._latest[load.replica] = load
                self._moved_at[load.replica] = now
        for r in [r for r in self._latest if r not in listed]:
            del self._latest[r], self._moved_at[r]
        self.expire(now)

    def expire(self, now: float) -> list[str]:
        """Drop the replicas whose load has not moved for ``staleness``; their ids."""
        gone = [r for r, t in self._moved_at.items() if now - t > self.staleness]
        for r in gone:
            del self._latest[r], self._moved_at[r]
        return gone

    def replicas(self) -> list[str]:
        return sorted(self._latest)

    def totals(self) -> PeerTotals:
        t = PeerTotals(replicas=len(self._latest))
        queued = nbytes = 0
        for load in self._latest.values():
            _add(t.inflight, load.inflight)
            _add(t.tokens, load.tokens)
            _add(t.recent, load.recent)
            queued += load.queued
            nbytes += load.queued_bytes
        return PeerTotals(t.inflight, t.tokens, t.recent, queued, nbytes, t.replicas)
