"""vLLM's prefix-cache block hashes, recomputed exactly.

vLLM (hash algo ``sha256``) hashes each full block of ``block_size`` token ids as
``sha256(pickle((parent_hash_bytes, tuple(token_ids), extra_keys)))``, chained from a root parent.
KV events publish the last 8 bytes of each 32-byte digest as a big-endian uint64. The simulator
uses this to publish events, and the precise prefix index uses it to look up a request's blocks
before it is sent.
"""

from __future__ import annotations

import hashlib
import pickle
from collections.abc import Sequence
from typing import Any

ROOT_SEED = "vllm-none-hash"


def sha256_pickle(value: Any) -> bytes:
    """vLLM's ``sha256`` hash function: sha256 over the highest-protocol pickle."""
    return hashlib.sha256(pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)).digest()


def root_hash(seed: str | None = None) -> bytes:
    """The parent hash of a sequence's first block."""
    return sha256_pickle(ROOT_SEED if seed is None else seed)


def external(digest: bytes) -> int:
    """The uint64 a KV event carries for a 32-byte block digest."""
    return int.from_bytes(digest[-8:], "big")


def extra_keys(lora: tuple[str, str] | None, cache_salt: str | None, block_index: int) -> tuple[Any, ...] | None:
    """vLLM's per-block extra keys: ("lora", name, path) for a LoRA request, then
    ("cache_salt", salt) on the first block only; None when there are none."""
    keys: list[Any] = []
    if lora is not None:
        keys.append(("lora", lora[0], lora[1]))
    if cache_salt and block_index == 0:
        keys.append(("cache_salt", cache_salt))
    return tuple(keys) if keys else None


def block_digests(
    token_ids: Sequence[int],
    block_size: int,
    parent: bytes,
    lora: tuple[str, str] | None = None,
    cache_salt: str | None = None,
    start_block: int = 0,
    max_blocks: int | None = None,
) -> list[bytes]:
    """Chained digests of the full blocks of ``token_ids`` from ``start_block`` on; ``lora`` is
    (adapter name, adapter path) as the server loaded it."""
    n_full = len(token_ids) // block_size
    if max_blocks is not None:
        n_full = min(n_full, start_block + max_blocks)
    out: list[bytes] = []
    for i in range(start_block, n_full):
        chunk = tuple(token_ids[i * block_size : (i + 1) * block_size])
        parent = sha256_pickle((parent, chunk, extra_keys(lora, cache_salt, i)))
        out.append(parent)
    return out


def block_hashes(token_ids: Sequence[int], block_size: int, seed: str | None = None,
                 lora: tuple[str, str] | None = None, cache_salt: str | None = None,
                 max_blocks: int | None = None) -> list[int]:
    """The uint64 keys KV events publish for the full blocks of a prompt."""
    digests = block_digests(token_ids, block_size, root_hash(seed), lora, cache_salt, max_blocks=max_blocks)
    return [external(d) for d in digests]


class BlockHasher:
    """``block_hashes`` with a bounded memo of (parent, tokens, extra keys) -> digest, as vLLM keeps
    one: requests sharing a prefix re-hash only their new blocks (a dict lookup instead of a
    pickle + sha256 per block)."""

    def __init__(self, seed: str | None = None, max_entries: int = 200_000) -> None:
        self.root = root_hash(seed)
        self.max_entries = max_entries
        self._memo: dict[tuple[Any, ...], bytes] = {}

    def hashes(self, token_ids: Sequence[int], block_size: int, lora: tuple[str, str] | None = None,
               cache_salt: str | None = None, max_blocks: int | None = None) -> list[int]:
        n = len(token_ids) // block_size
        if max_blocks is not None:
            n = min(n, max_blocks)
        memo = self._memo
        parent = self.root
        out: list[int] = []
        for i in range(n):
            key = (parent, tuple(token_ids[i * block_size : (i + 1) * block_size]), extra_keys(lora, cache_salt, i))
            digest = memo.get(key)
            if digest is None:
                digest = sha256_pickle(key)
                if len(memo) >= self.max_entries:
                    memo.clear()
                memo[key] = digest
            out.append(int.from_bytes(digest[-8:], "big"))
            parent = digest
        return out
