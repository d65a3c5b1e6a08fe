"""A vLLM-style paged KV cache with prefix caching.

Blocks are reference counted. A full block gets a chained hash and stays cached after its last
user frees it; cached blocks with no user sit in an LRU free queue and are evicted (a BlockRemoved
event) only when a new block is needed. Storing a block emits BlockStored. Events are collected
per engine step and published as one batch, as vLLM does.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from epp.blockhash import external


@dataclass(slots=True)
class Block:
    block_id: int
    ref: int = 0
    digest: bytes | None = None


@dataclass(slots=True)
class KVEvents:
    """Events of one engine step, in vLLM's wire shape (maps tagged by ``type``)."""

    items: list[dict[str, Any]] = field(default_factory=list)

    def stored(self, digests: list[bytes], parent: bytes | None, token_ids: list[int], block_size: int,
               lora_name: str | None) -> None:
        self.items.append({
            "type": "BlockStored",
            "block_hashes": [external(d) for d in digests],
            "parent_block_hash": None if parent is None else external(parent),
            "token_ids": token_ids,
            "block_size": block_size,
            "lora_id": None,
            "medium": "GPU",
            "lora_name": lora_name,
            "extra_keys": [None if lora_name is None else (lora_name,)] * len(digests),
            "group_idx": 0,
            "kv_cache_spec_kind": "full_attention",
        })

    def removed(self, digest: bytes) -> None:
        # vLLM 0.32 publishes one BlockRemoved per evicted block.
        self.items.append({"type": "BlockRemoved", "block_hashes": [external(digest)], "medium": "GPU",
                           "group_idx": 0})

    def cleared(self) -> None:
        self.items.append({"type": "AllBlocksCleared"})


class KVCache:
    """Block pool of ``num_blocks`` x ``block_size`` tokens.

    Free blocks come in three kinds, used in this order: never used (a counter, so an idle
    engine holds no per-block objects), freed without a hash (a stack), and cached with no user
    (an LRU; taking one evicts its hash).
    """

    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True) -> None:
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.prefix_caching = prefix_caching
        self.blocks: dict[int, Block] = {}
        self._fresh = 0  # ids below this have a Block
        self._uncached: list[int] = []
        # Cached blocks with ref == 0, least recently freed first (evicted first).
        self.free: OrderedDict[int, None] = OrderedDict()
        self.cached: dict[bytes, int] = {}
        self.events = KVEvents()

    # -- queries ---------------------------------------------------------------------------
    def num_free(self) -> int:
        return (self.num_blocks - self._fresh) + len(self._uncached) + len(self.free)

    def usage(self) -> float:
        """Fraction of blocks held by running requests (vLLM's kv_cache_usage_perc)."""
        return 1.0 - self.num_free() / self.num_blocks if self.num_blocks else 0.0

    def longest_hit(self, digests: list[bytes]) -> int:
        """Number of leading blocks of ``digests`` that are cached."""
        if not self.prefix_caching:
            return 0
        n = 0
        for d in digests:
            if d not in self.cached:
                break
            n += 1
        return n

    # -- mutation --------------------------------------------------------------------------
    def touch(self, digests: list[bytes]) -> list[int]:
        """Take a reference on the cached blocks for ``digests`` (all must be cached)."""
        ids = []
        for d in digests:
            bid = self.cached[d]
            blk = self.blocks[bid]
            if blk.ref == 0:
                del self.free[bid]
            blk.ref += 1
            ids.append(bid)
        return ids

    def allocate(self, n: int) -> list[int] | None:
        """``n`` blocks for new tokens, evicting least recently used cached ones; None if not enough."""
        if n > self.num_free():
            return None
        ids = []
        for _ in range(n):
            if self._uncached:
                bid = self._uncached.pop()
                blk = self.blocks[bid]
            elif self._fresh < self.num_blocks:
                bid = self._fresh
                self._fresh += 1
                blk = self.blocks[bid] = Block(bid)
            else:
                bid, _ = self.free.popitem(last=False)
                blk = self.blocks[bid]
                if blk.digest is not None:
                    if self.cached.get(blk.digest) == bid:
                        del self.cached[blk.digest]
                        self.events.removed(blk.digest)
                    blk.digest = None
            blk.ref = 1
            ids.append(bid)
        return ids

    def release(self, block_ids: list[int]) -> None:
        """Drop a request's references; tail blocks first so they are evicted first."""
        for bid in reversed(block_ids):
            blk = self.blocks[bid]
            blk.ref -= 1
            if blk.ref == 0:
                if blk.digest is None:
                    self._uncached.append(bid)  # nothing to lose: reused first
                else:
                    self.free[bid] = None

    def store(self, block_ids: list[int], digests: list[bytes], parent: bytes | None, token_ids: list[int],
              lora_name: str | None) -> None:
        """Mark full blocks as cached under ``digests`` and emit one BlockStored."""
        if not self.prefix_caching or not digests:
            return
        new_digests: list[bytes] = []
        new_tokens: list[int] = []
        first_parent = parent
        for i, (bid, d) in enumerate(zip(block_ids, digests, strict=True)):
            blk = self.blocks[bid]
            if blk.digest is not None:
                continue  # came from the cache
            blk.digest = d
            if d in self.cached:
                continue  # another request stored the same block meanwhile
            self.cached[d] = bid
            if not new_digests:
                first_parent = digests[i - 1] if i > 0 else parent
            new_digests.append(d)
            new_tokens.extend(token_ids[i * self.block_size : (i + 1) * self.block_size])
        if new_digests:
            self.events.stored(new_digests, first_parent, new_tokens, self.block_size, lora_name)

    def reset(self) -> bool:
        """vLLM's reset_prefix_cache: only when no block is in use."""
        if any(b.ref for b in self.blocks.values()):
            return False
        self.blocks.clear()
        self._fresh = 0
        self._uncached.clear()
        self.cached.clear()
        self.free.clear()
        self.events.cleared()
        return True

    def take_events(self) -> list[dict[str, Any]]:
        items = self.events.items
        self.events = KVEvents()
        return items
