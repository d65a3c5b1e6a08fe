"""Approximate prefix-cache index: where epp sent which prompt prefixes.

The prompt is cut into fixed-size character blocks (blockSizeTokens x 4 characters, the
reference's estimate). Block i's key is the xxh3-64 of block i seeded with block i-1's key (the
model name's hash first): a chained hash that names the whole prefix. After a pick, the chosen
endpoint's LRU records the request's block hashes deepest first, so the first block is the most
recently used and eviction takes a prefix's deepest blocks first, as vLLM frees a request's
blocks tail first. What an endpoint holds of a prompt is then always a leading run of its
blocks, and its match is a bisection. Memory is bounded: ``lru_capacity`` hashes per endpoint.
"""

from __future__ import annotations

import struct
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence, Set
from dataclasses import dataclass

import xxhash

from epp.datastore.endpoint import EndpointState
from epp.datastore.store import Snapshot
from epp.request import InferenceRequest
from epp.scheduling.balance import spread_hot_prefixes
from epp.scheduling.params import BLOCK_SIZE_LIMIT, BLOCKS_PER_SERVER_LIMIT, BLOCKS_TO_MATCH_LIMIT, Params
from epp.scheduling.types import CANDIDATE_LOADS, CHARS_PER_TOKEN, MATCHED_TOKENS, CycleState


def leading_matches(hashes: Sequence[int], holders_of: Callable[[int], Set[str] | None]) -> dict[str, int]:
    """For each holder, how many leading blocks of ``hashes`` it holds (shared by both indexes)."""
    result: dict[str, int] = {}
    if not hashes:
        return result
    first = holders_of(hashes[0])
    if not first:
        return result
    alive = set(first)
    depth = 1
    for h in hashes[1:]:
        holders = holders_of(h)
        if not holders:
            break
        if not alive <= holders:  # some holders stop matching here
            for a in alive - holders:
                result[a] = depth
            alive &= holders
            if not alive:
                return result
        depth += 1
    for a in alive:
        result[a] = depth
    return result


Holders = dict[int, str | set[str]]  # block hash -> its one holder, or the set of several


def add_holder(holders: Holders, h: int, who: str) -> None:
    """``who`` holds block ``h`` too. One holder is kept as the string itself: most blocks have
    one, and a set per block made every block a container the garbage collector walks (a full
    collection over a filled index of 8 pods took ~70 ms)."""
    known = holders.get(h)
    if known is None:
        holders[h] = who
    elif isinstance(known, str):
        if known != who:
            holders[h] = {known, who}
    else:
        known.add(who)


def drop_holder(holders: Holders, h: int, who: str) -> None:
    """``who`` no longer holds block ``h``."""
    known = holders.get(h)
    if known is None:
        return
    if isinstance(known, str):
        if known == who:
            del holders[h]
        return
    known.discard(who)
    if len(known) == 1:
        holders[h] = next(iter(known))
    elif not known:
        del holders[h]


def holders_of(holders: Holders, h: int) -> Set[str] | None:
    """The holders of block ``h`` as a set (None: nobody)."""
    known = holders.get(h)
    if known is None or isinstance(known, set):
        return known
    return {known}


JOURNAL_LIMIT = 100_000  # records kept for the next take (more is a store that stopped reading)
LAYOUTS_KEPT = 64  # block-cutting structs cached (one per prompt length in blocks)


class PrefixIndex:
    """Block hash -> endpoints holding it, with one LRU per endpoint."""

    def __init__(self, block_size_tokens: int = 16, max_blocks: int = 256, lru_capacity: int = 31250) -> None:
        self.block_tokens = block_size_tokens
        self.block_chars = block_size_tokens * CHARS_PER_TOKEN
        self.max_blocks = max_blocks
        self.lru_capacity = lru_capacity
        self.capacities: dict[str, int] = {}  # per endpoint, where it differs (its own GPU blocks)
        self._holders: Holders = {}
        self._lru: dict[str, OrderedDict[int, None]] = {}
        self._layouts: dict[int, struct.Struct] = {}
        # What was recorded since the journal was last taken (None: nobody takes it), bounded.
        self.journal: list[tuple[str, list[int]]] | None = None

    def hashes(self, model: str, prompt: str) -> list[int]:
        """Chained hashes of the prompt's full blocks (at most ``max_blocks``): each block's hash
        is seeded with the one before (the model's name first), so a hash names the whole prefix
        and every byte is hashed once. The blocks come out of one ``struct`` unpack (slicing
        them one by one took half of the 30 us a 15 KB prompt cost)."""
        data = prompt.encode("utf-8", "surrogatepass")
        n = min(len(data) // self.block_chars, self.max_blocks)
        if not n:
            return []
        h = xxhash.xxh3_64_intdigest
        prev = h(model.encode())
        out: list[int] = []
        append = out.append
        for block in self._blocks(n).unpack_from(data):
            prev = h(block, prev)
            append(prev)
        return out

    def _blocks(self, n: int) -> struct.Struct:
        """A ``struct`` that cuts ``n`` blocks (one per block count seen, at most ``max_blocks``)."""
        layout = self._layouts.get(n)
        if layout is None:
            if len(self._layouts) >= LAYOUTS_KEPT:
                self._layouts.clear()
            layout = self._layouts[n] = struct.Struct(f"{self.block_chars}s" * n)
        return layout

    def match_lengths(self, hashes: list[int]) -> dict[str, int]:
        """For each endpoint, how many leading blocks of ``hashes`` it holds."""
        if not hashes:
            return {}
        first = self._holders.get(hashes[0])
        if first is None:
            return {}
        if isinstance(first, str):
            return {first: self._held(first, hashes)}
        return {a: self._held(a, hashes) for a in first}

    def holders_of(self, h: int) -> Set[str] | None:
        return holders_of(self._holders, h)

    def _held(self, address: str, hashes: list[int]) -> int:
        """How many leading blocks of ``hashes`` ``address`` holds: what it holds of a prompt is a
        leading run (see the module's docstring), so the deepest held block is found by bisection."""
        lru = self._lru.get(address)
        if not lru:
            return 0
        lo, hi = 0, len(hashes)  # hashes[:lo] are held; hashes[hi:] are not
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if hashes[mid - 1] in lru:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def matched_tokens(self, matches: dict[str, int]) -> dict[str, int]:
        """Matched blocks -> estimated prompt tokens."""
        per_block = self.block_tokens
        return {a: n * per_block for a, n in matches.items()}

    def record(self, address: str, hashes: list[int]) -> None:
        journal = self.journal
        if journal is not None and len(journal) < JOURNAL_LIMIT:
            journal.append((address, hashes))
        self.record_peer(address, hashes)

    def record_peer(self, address: str, hashes: list[int]) -> None:
        """Record what another replica recorded (not journalled again)."""
        lru = self._lru.get(address)
        if lru is None:
            lru = self._lru[address] = OrderedDict()
        held = self._held(address, hashes)
        all_holders = self._holders
        for h in reversed(hashes[held:]):  # new blocks, deepest first
            lru[h] = None
            add_holder(all_holders, h, address)
        deque(map(lru.move_to_end, reversed(hashes[:held])), 0)  # then the held ones, the first block last
        capacity = self.capacities.get(address, self.lru_capacity)
        while len(lru) > capacity:
            drop_holder(all_holders, lru.popitem(last=False)[0], address)

    def forget(self, address: str) -> None:
        """Drop an endpoint that left the pool."""
        lru = self._lru.pop(address, None)
        if not lru:
            return
        for h in lru:
            drop_holder(self._holders, h, address)

    def size(self) -> int:
        return sum(len(v) for v in self._lru.values())


@dataclass(slots=True)
class ApproximatePrefix:
    """Both prefix scorers' approximate matching, from the parameters they share (the
    reference's names and defaults): the index, and hot-prefix spreading's thresholds."""

    index: PrefixIndex
    balance_abs: float
    balance_rel: float

    @classmethod
    def from_params(cls, params: Params) -> ApproximatePrefix:
        index = PrefixIndex(params.int("blockSizeTokens", 16, minimum=1, maximum=BLOCK_SIZE_LIMIT),
                            params.int("maxPrefixBlocksToMatch", 256, minimum=1, maximum=BLOCKS_TO_MATCH_LIMIT),
                            params.int("lruCapacityPerServer", 31250, minimum=1, maximum=BLOCKS_PER_SERVER_LIMIT))
        return cls(index, params.float("balanceAbsThreshold", 4.0),
                   params.float("balanceRelThreshold", 1.5, minimum=1.0))

    def hashes(self, request: InferenceRequest) -> list[int]:
        return self.index.hashes(request.model, request.prompt) if request.prompt else []

    def score(self, hashes: list[int], snapshot: Snapshot, candidates: list[EndpointState],
              cycle: CycleState) -> list[float]:
        """Matched leading blocks / prompt blocks per candidate, hot prefixes spread; the matches
        go to the cycle's MATCHED_TOKENS slot."""
        if not hashes:
            return [0.0] * len(candidates)
        matches = self.index.match_lengths(hashes)
        cycle.put(MATCHED_TOKENS, self.index.matched_tokens(matches))
        held_of, per_block = matches.get, 1.0 / len(hashes)
        return self.spread([held_of(c.address, 0) * per_block for c in candidates], snapshot, candidates, cycle)

    def spread(self, scores: list[float], snapshot: Snapshot, candidates: list[EndpointState],
               cycle: CycleState) -> list[float]:
        return spread_hot_prefixes(scores, snapshot, candidates, self.balance_abs, self.balance_rel,
                                   cycle.get(CANDIDATE_LOADS))
