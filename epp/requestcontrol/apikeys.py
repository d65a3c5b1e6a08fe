"""API keys (``--api-keys-file``): who may send requests, as which tenant, at which tier.

The file (YAML; in Kubernetes a Secret mounted as a file) lists keys by their SHA-256 only:

    keys:
    - {id: team-a-1, sha256: 9f86d0...,  tenant: team-a, tier: premium}
    - {id: batch-7,  sha256: 2c26b4...,  tenant: batch,  tier: batch, active: false}
    - {id: trial-1,  sha256: fcde2b...,  tenant: trial,
       limits: {requestsPerMinute: 10, tokensPerMinute: 20000, concurrency: 4}}

``key`` (the key itself) is read too and hashed at load, with a warning: the file then holds a
secret in clear. A request presents its key as ``Authorization: Bearer <key>`` or ``x-api-key``;
a missing, unknown or inactive key is refused with 401 before anything else (it reaches no queue
and no model server). The presented key is hashed and found by its digest, then the digests are
compared with ``hmac.compare_digest``: nothing about a key leaks through timing, and the key
itself is never kept. The key's ``tenant`` is the request's flow-control fairness id and its
``tier`` the InferenceObjective whose priority it gets (the client's own objective and fairness
headers are overridden).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass

import yaml

from epp.requestcontrol.refused import Refused

log = logging.getLogger("epp.apikeys")
API_KEY = "api-key"  # where the request's key is kept (InferenceRequest.prepared)
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True, slots=True)
class ApiKey:
    key_id: str  # a name for the key (logs and metrics; never the key)
    digest: bytes  # sha256 of the key
    tenant: str
    tier: str = ""
    active: bool = True
    rpm: int | None = None  # limits.requestsPerMinute (None: no limit)
    tpm: int | None = None  # limits.tokensPerMinute: prompt + completion, charged when the response ends
    concurrency: int | None = None  # limits.concurrency: requests under way at once (queued ones included)

    @property
    def limited(self) -> bool:
        return self.rpm is not None or self.tpm is not None or self.concurrency is not None


def digest_of(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def presented_key(headers: Mapping[str, str]) -> str:
    """The key a request carries: ``Authorization: Bearer <key>``, else ``x-api-key``."""
    auth = headers.get("authorization", "")
    scheme, _, value = auth.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return headers.get("x-api-key", "").strip()


class KeyTable:
    def __init__(self, keys: list[ApiKey]) -> None:
        self.by_digest = {k.digest: k for k in keys}

    def __len__(self) -> int:
        return len(self.by_digest)

    def check(self, headers: Mapping[str, str]) -> ApiKey:
        """The request's key; Refused(401) when it is missing, unknown or inactive."""
        presented = presented_key(headers)
        if not presented:
            raise Refused(401, "missing API key: send it as 'Authorization: Bearer <key>' or 'x-api-key'")
        d = digest_of(presented)
        found = self.by_digest.get(d)
        if found is None or not hmac.compare_digest(found.digest, d):
            raise Refused(401, "invalid API key")
        if not found.active:
            raise Refused(401, f"API key {found.key_id!r} is inactive")
        return found


LIMITS = ("requestsPerMinute", "tokensPerMinute", "concurrency")


def _limits(raw: object, path: str) -> tuple[int | None, ...]:
    if raw is None:
        return None, None, None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping")
    unknown = sorted(set(raw) - set(LIMITS))
    if unknown:
        raise ValueError(f"{path}.{unknown[0]}: unknown field (allowed: {', '.join(LIMITS)})")
    out: list[int | None] = []
    for name in LIMITS:
        v = raw.get(name)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not 0 < v <= 10**9):
            raise ValueError(f"{path}.{name}: expected a positive integer, got {v!r}")
        out.append(v)
    return tuple(out)


def parse_keys_file(text: str, source: str) -> KeyTable:
    """The keys file; ValueError naming the file and the entry (a bad edit keeps the old keys)."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ValueError(f"{source}: invalid YAML: {err}") from None
    entries = data.get("keys") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise ValueError(f"{source}: expected a mapping with a 'keys' list")
    keys: list[ApiKey] = []
    ids: set[str] = set()
    clear = 0
    for i, e in enumerate(entries):
        path = f"{source}: keys[{i}]"
        if not isinstance(e, dict):
            raise ValueError(f"{path}: expected a mapping")
        unknown = sorted(set(e) - {"id", "sha256", "key", "tenant", "tier", "active", "limits"})
        if unknown:
            raise ValueError(f"{path}.{unknown[0]}: unknown field "
                             "(allowed: id, sha256, key, tenant, tier, active, limits)")
        rpm, tpm, concurrency = _limits(e.get("limits"), f"{path}.limits")
        key_id, tenant, tier, active = e.get("id"), e.get("tenant"), e.get("tier", ""), e.get("active", True)
        for name, value in (("id", key_id), ("tenant", tenant)):
            if not isinstance(value, str) or not value:
                raise ValueError(f"{path}.{name}: required (a string)")
        if not isinstance(tier, str):
            raise ValueError(f"{path}.tier: expected a string")
        if not isinstance(active, bool):
            raise ValueError(f"{path}.active: expected true or false")
        assert isinstance(key_id, str) and isinstance(tenant, str)
        if key_id in ids:
            raise ValueError(f"{path}.id: duplicate id {key_id!r}")
        ids.add(key_id)
        sha, plain = e.get("sha256"), e.get("key")
        if (sha is None) == (plain is None):
            raise ValueError(f"{path}: give one of sha256 (preferred) or key")
        if sha is not None:
            if not isinstance(sha, str) or not _HEX64.match(sha.lower()):
                raise ValueError(f"{path}.sha256: expected 64 hex digits")
            d = bytes.fromhex(sha.lower())
        else:
            if not isinstance(plain, str) or len(plain) < 16:
                raise ValueError(f"{path}.key: expected a string of at least 16 characters")
            d = digest_of(plain)
            clear += 1
        keys.append(ApiKey(key_id, d, tenant, tier, active, rpm, tpm, concurrency))
    if len({k.digest for k in keys}) != len(keys):
        raise ValueError(f"{source}: two entries have the same key")
    if clear:
        log.warning("%s: %d key(s) given in clear; store their sha256 instead (printf %%s KEY | sha256sum)",
                    source, clear)
    return KeyTable(keys)
