"""``burst-prefix-cache-producer`` (the reference's): requests that arrive within a window are
placed jointly, so the samples of one prompt (an RL rollout's ``n`` samples, a fan-out) land on
one replica and its prefix is prefilled once, not on every replica while their caches are cold.

Each request waits up to ``windowDurationMs`` (100) before it is scheduled (the director awaits
``prepare``); when the window seals, ``assign`` (pure) groups the batch by identical prefix blocks
and places each group of two or more on one replica, up to ``maxPerReplica`` (-1: no cap) before
spilling to the next least-loaded one; with ``minColocateBlocks`` > 0 a request sharing that many
leading blocks with others also becomes a unit and prefers a replica holding them, within its fair
share of the batch. ``balanceBy`` counts load in requests or in prefix blocks (``tokens``).
The match it publishes is the whole prompt on the assigned replica and nothing elsewhere, for the
``prefix-cache-scorer`` that names it; a request in no group gets none. ``maxBatchSize`` (1000,
-1: none) bounds a window; past it a request goes on at once without affinity.

Blocks: ``blockSizeTokens`` (64) of the request's token ids (the token producer's), or of its
prompt's bytes packed four to a pseudo-token (the reference's estimate) when it has none;
``maxPrefixTokensToMatch`` (0: 2,048 blocks) caps them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import xxhash

from epp.datastore.endpoint import EndpointState
from epp.datastore.store import Snapshot
from epp.request import InferenceRequest
from epp.scheduling.contract import PrefixProducer, PreparesRequests
from epp.scheduling.params import Params
from epp.scheduling.types import ConfigError, CycleState, PrefixMatch

log = logging.getLogger("epp.burst")

UNLIMITED = -1
MAX_WINDOW_MS = 10_000
DEFAULT_MAX_BLOCKS = 2048
BYTES_PER_TOKEN = 4


def block_hashes(request: InferenceRequest, block_tokens: int, max_blocks: int) -> list[int]:
    """Chained hashes of the request's full blocks (token ids, or the prompt's packed bytes)."""
    if request.token_ids:
        data = b"".join(t.to_bytes(4, "little") for t in request.token_ids)
    else:
        data = request.prompt.encode()
    size = block_tokens * BYTES_PER_TOKEN
    n = min(len(data) // size, max_blocks)
    out: list[int] = []
    parent = 0
    for i in range(n):
        parent = xxhash.xxh3_64_intdigest(data[i * size:(i + 1) * size], seed=parent)
        out.append(parent)
    return out


@dataclass(slots=True)
class Entry:
    """One request of a window: its blocks, and the replica the batch assigned it (if any)."""

    hashes: list[int]
    assigned: str | None = None


@dataclass(frozen=True, slots=True)
class Replica:
    address: str
    running: float  # its running requests (the tie-break after load)


@dataclass(slots=True)
class _Placement:
    replicas: Sequence[Replica]
    k: int
    min_colocate: int
    max_share: int
    by_tokens: bool
    load: dict[str, int] = field(default_factory=dict)
    holders: dict[int, set[str]] = field(default_factory=dict)  # block -> replicas given it in this batch

    def longest(self, hashes: list[int]) -> dict[str, int]:
        """Per replica, the leading blocks of ``hashes`` already placed there."""
        out: dict[str, int] = {}
        for h in hashes:
            got = self.holders.get(h)
            if not got:
                break
            for r in got:
                out[r] = out.get(r, 0) + 1
        return out

    def _key(self, r: Replica) -> tuple[int, float, str]:
        return self.load.get(r.address, 0), r.running, r.address

    def pick(self, per: dict[str, int], matches: dict[str, int], prefer: bool) -> Replica:
        k = self.k
        open_ = [r for r in self.replicas if k == UNLIMITED or per.get(r.address, 0) < k]
        if prefer:
            fits = [r for r in open_ if self.load.get(r.address, 0) < self.max_share
                    and matches.get(r.address, 0) >= self.min_colocate]
            if fits:
                return min(fits, key=lambda r: (-matches.get(r.address, 0), *self._key(r)))
        return min(open_ or self.replicas, key=self._key)

    def place(self, members: list[Entry], cost: int) -> None:
        hashes = members[0].hashes
        prefer = self.min_colocate > 0
        matches = self.longest(hashes) if prefer or self.by_tokens else {}
        per: dict[str, int] = {}
        i = 0
        while i < len(members):
            target = self.pick(per, matches, prefer).address
            run = len(members) - i
            if self.k != UNLIMITED:
                run = min(run, max(1, self.k - per.get(target, 0)))
            for m in members[i:i + run]:
                m.assigned = target
            first = per.get(target, 0) == 0
            per[target] = per.get(target, 0) + run
            if not self.by_tokens:
                self.load[target] = self.load.get(target, 0) + run
            elif first:
                self.load[target] = self.load.get(target, 0) + max(0, cost - matches.get(target, 0))
            i += run
            prefer = False  # only the first replica gets the prefix preference
        for m in members:
            if m.assigned is not None:
                for h in hashes:
                    self.holders.setdefault(h, set()).add(m.assigned)


def assign(entries: Sequence[Entry], replicas: Sequence[Replica], k: int, min_colocate: int, by_tokens: bool) -> None:
    """Place a sealed window's entries (sets ``assigned``): identical-prefix groups first, longest
    prefixes first; then the single requests that share ``min_colocate`` leading blocks."""
    if not replicas:
        return
    groups: dict[tuple[int, ...], list[Entry]] = {}
    for e in entries:
        if e.hashes:
            groups.setdefault(tuple(e.hashes), []).append(e)
    shared: set[tuple[int, ...]] = set()
    if min_colocate > 0:
        count: dict[tuple[int, ...], int] = {}
        for key, members in groups.items():
            if len(key) >= min_colocate:
                count[key[:min_colocate]] = count.get(key[:min_colocate], 0) + len(members)
        shared = {key for key in groups if len(key) >= min_colocate and count[key[:min_colocate]] >= 2}
    units = [key for key, members in groups.items() if len(members) >= 2]
    singles = [key for key, members in groups.items() if len(members) == 1 and key in shared]
    if not units and not singles:
        return
    units.sort(key=len, reverse=True)  # stable: arrival order among equal lengths
    singles.sort(key=len, reverse=True)
    total = sum(len(key) if by_tokens else len(groups[key]) for key in (*units, *singles))
    p = _Placement(replicas, k, min_colocate, -(-total // len(replicas)), by_tokens)
    for key in (*units, *singles):
        p.place(groups[key], len(key))


class _Window:
    __slots__ = ("entries", "sealed")

    def __init__(self) -> None:
        self.entries: list[Entry] = []
        self.sealed: asyncio.Future[None] = asyncio.get_running_loop().create_future()


class BurstPrefixProducer(PrefixProducer, PreparesRequests):
    type_name: ClassVar[str] = "burst-prefix-cache-producer"
    # No MATCHED_TOKENS: the assigned replica is an affinity, not a cache (the prompt is computed there).

    def __init__(self, name: str, params: Params) -> None:
        self.name = name
        self.window = params.int("windowDurationMs", 100, minimum=1, maximum=MAX_WINDOW_MS) / 1000
        self.k = params.int("maxPerReplica", UNLIMITED, minimum=UNLIMITED, maximum=1_000_000)
        self.block_tokens = params.int("blockSizeTokens", 64, minimum=1, maximum=1 << 20)
        max_tokens = params.int("maxPrefixTokensToMatch", 0, minimum=0, maximum=1 << 30)
        self.min_colocate = params.int("minColocateBlocks", 0, minimum=0, maximum=DEFAULT_MAX_BLOCKS)
        self.max_batch = params.int("maxBatchSize", 1000, minimum=UNLIMITED, maximum=1_000_000)
        self.by_tokens = params.text("balanceBy", "requests", choices=("requests", "tokens")) == "tokens"
        params.done()
        for key, v in (("maxPerReplica", self.k), ("maxBatchSize", self.max_batch)):
            if v == 0:
                raise ConfigError(f"{params.path}.{key}", "must be -1 (unlimited) or >= 1")
        if 0 < max_tokens < self.block_tokens:
            raise ConfigError(f"{params.path}.maxPrefixTokensToMatch",
                              f"must be 0 or >= blockSizeTokens ({self.block_tokens}): a smaller one matches no block")
        self.max_blocks = max_tokens // self.block_tokens if max_tokens else DEFAULT_MAX_BLOCKS
        self._window: _Window | None = None
        self.batches = 0
        self.overflowed = 0

    # -- the window (request control) -----------------------------------------------------------
    def prepare(self, request: InferenceRequest, snapshot: Snapshot) -> Callable[[], Awaitable[None]] | None:
        entry = Entry(block_hashes(request, self.block_tokens, self.max_blocks))
        request.prepared[self.name] = entry
        if not entry.hashes:
            return None  # nothing to share: no reason to wait
        w = self._window
        if w is None:
            w = self._window = _Window()
            replicas = [Replica(e.address, e.signals.running if e.signals else 0)
                        for e in (snapshot.fresh() or snapshot.endpoints)]
            asyncio.get_running_loop().call_later(self.window, self._seal, w, replicas)
        if self.max_batch != UNLIMITED and len(w.entries) >= self.max_batch:
            self.overflowed += 1
            return None  # the window is full: this one goes on without affinity
        w.entries.append(entry)
        sealed = w.sealed

        async def wait() -> None:
            await asyncio.shield(sealed)

        return wait

    def _seal(self, w: _Window, replicas: list[Replica]) -> None:
        if self._window is w:
            self._window = None
        self.batches += 1
        assign(w.entries, replicas, self.k, self.min_colocate, self.by_tokens)
        w.sealed.set_result(None)

    async def close(self) -> None:
        return None

    # -- the match (scheduling) -----------------------------------------------------------------
    def match(self, request: InferenceRequest, candidates: list[EndpointState], cycle: CycleState) -> PrefixMatch:
        entry = request.prepared.get(self.name)
        if not isinstance(entry, Entry):
            entry = Entry(block_hashes(request, self.block_tokens, self.max_blocks))  # it did not wait (no body)
        blocks: dict[str, int] = {}
        if entry.assigned is not None and any(c.address == entry.assigned for c in candidates):
            blocks[entry.assigned] = len(entry.hashes)
        return PrefixMatch(entry.hashes, blocks, self.block_tokens)

    def record(self, endpoint: str, cycle: CycleState) -> None:
        return None  # it remembers nothing across windows (a persistent prefix producer does)
