"""Per-key limits (the API keys file's ``limits``): requests per minute and tokens per minute, as
token buckets that refill continuously (a key may burst its whole minute at once), and
concurrency, the key's requests under way at once (waiting in flow control included).

A request takes one request token when it arrives; its tokens (the response's prompt +
completion usage) are charged when it ends, so a key may go below zero with one long answer and
then waits until the bucket refills. Refused requests answer 429 with ``Retry-After`` and the
``x-ratelimit-limit-*`` / ``-remaining-*`` / ``-reset-*`` headers OpenAI clients read; routed ones
carry the same headers on their response. The counters are this process's: with several epp
replicas each holds its own, so a key gets up to N times its limit.

A concurrency slot is taken once the request is parsed and given back exactly once (``Slot``):
when its response ends, when it is refused later, or, should a path forget, when the request
object goes away.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass

from epp.requestcontrol.apikeys import ApiKey
from epp.requestcontrol.refused import Refused


@dataclass(slots=True)
class Bucket:
    capacity: float
    level: float
    updated: float

    def refill(self, now: float) -> None:
        rate = self.capacity / 60.0
        self.level = min(self.capacity, self.level + (now - self.updated) * rate)
        self.updated = now

    def wait(self) -> float:
        """Seconds until the level is back above zero (0: it is)."""
        return 0.0 if self.level >= 1.0 else (1.0 - self.level) * 60.0 / self.capacity

    def reset(self) -> float:
        """Seconds until it is full again."""
        return (self.capacity - self.level) * 60.0 / self.capacity


def _duration(seconds: float) -> str:
    """OpenAI's reset format: ``1m30s``, ``2s``, ``250ms``."""
    if seconds < 1.0:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    m, s = divmod(math.ceil(seconds), 60)
    return f"{m}m{s}s" if m else f"{s}s"


class Slot:
    """One request's place in its key's concurrency; ``release`` is idempotent."""

    __slots__ = ("__weakref__", "_key_id", "_limits")

    def __init__(self, limits: RateLimits, key_id: str) -> None:
        self._limits: RateLimits | None = limits
        self._key_id = key_id

    def release(self) -> None:
        limits, self._limits = self._limits, None
        if limits is not None:
            n = limits.inflight.get(self._key_id, 0) - 1
            if n > 0:
                limits.inflight[self._key_id] = n
            else:
                limits.inflight.pop(self._key_id, None)


class RateLimits:
    """The buckets of every key with limits, by key id (they survive a reload of the keys file)."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self._requests: dict[str, Bucket] = {}
        self._tokens: dict[str, Bucket] = {}
        self.inflight: dict[str, int] = {}  # key id -> requests under way (keys with a concurrency limit)

    def acquire(self, key: ApiKey, owner: object) -> Slot | None:
        """A concurrency slot for ``key``, given back at the latest when ``owner`` goes away;
        Refused(429) when the key already has ``concurrency`` requests under way."""
        limit = key.concurrency
        if limit is None:
            return None
        n = self.inflight.get(key.key_id, 0)
        if n >= limit:
            raise Refused(429, f"API key {key.key_id!r} already has {limit} requests under way; retry when one ends",
                          headers=(("retry-after", "1"), ("x-ratelimit-limit-concurrency", str(limit)),
                                   ("x-ratelimit-remaining-concurrency", "0")))
        self.inflight[key.key_id] = n + 1
        slot = Slot(self, key.key_id)
        weakref.finalize(owner, slot.release)
        return slot

    def _bucket(self, table: dict[str, Bucket], key_id: str, capacity: int, now: float) -> Bucket:
        b = table.get(key_id)
        if b is None:
            b = table[key_id] = Bucket(float(capacity), float(capacity), now)
        elif b.capacity != capacity:  # the file changed the limit
            b.level = min(b.level, float(capacity))
            b.capacity = float(capacity)
        b.refill(now)
        return b

    def admit(self, key: ApiKey) -> None:
        """Take one request token for ``key``; Refused(429) with the rate headers when it has none."""
        now = self.clock()
        if key.rpm is not None:
            b = self._bucket(self._requests, key.key_id, key.rpm, now)
            if b.level < 1.0:
                raise Refused(429, f"API key {key.key_id!r} is over its {key.rpm} requests per minute; retry later",
                              headers=(("retry-after", str(math.ceil(b.wait()))), *self.headers(key)))
            b.level -= 1.0
        if key.tpm is not None:
            t = self._bucket(self._tokens, key.key_id, key.tpm, now)
            if t.level < 1.0:
                raise Refused(429, f"API key {key.key_id!r} is over its {key.tpm} tokens per minute; retry later",
                              headers=(("retry-after", str(math.ceil(t.wait()))), *self.headers(key)))

    def charge(self, key: ApiKey, tokens: int) -> None:
        """The request's response used ``tokens`` (prompt + completion)."""
        if key.tpm is not None and tokens > 0:
            self._bucket(self._tokens, key.key_id, key.tpm, self.clock()).level -= tokens

    def headers(self, key: ApiKey) -> tuple[tuple[str, str], ...]:
        """The x-ratelimit-* headers of ``key`` now."""
        out: list[tuple[str, str]] = []
        now = self.clock()
        for kind, limit, table in (("requests", key.rpm, self._requests), ("tokens", key.tpm, self._tokens)):
            if limit is None:
                continue
            b = self._bucket(table, key.key_id, limit, now)
            out += [(f"x-ratelimit-limit-{kind}", str(limit)),
                    (f"x-ratelimit-remaining-{kind}", str(max(0, math.floor(b.level)))),
                    (f"x-ratelimit-reset-{kind}", _duration(b.reset()))]
        return tuple(out)
