"""API keys: the file (hashed keys, tenants, tiers), the check (Bearer or x-api-key; 401 for a
missing, unknown or inactive key), and what a bad edit does."""

from __future__ import annotations

import hashlib

import pytest

from epp.requestcontrol.apikeys import parse_keys_file, presented_key
from epp.requestcontrol.refused import Refused

KEY_A = "sk-team-a-0123456789abcdef"
KEY_B = "sk-batch-fedcba9876543210"


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


FILE = f"""keys:
- {{id: team-a-1, sha256: {sha(KEY_A)}, tenant: team-a, tier: premium}}
- {{id: batch-7, sha256: {sha(KEY_B)}, tenant: batch, tier: batch, active: false}}
"""


def test_a_valid_key_names_its_tenant_and_tier_by_either_header() -> None:
    table = parse_keys_file(FILE, "keys.yaml")
    for headers in ({"authorization": f"Bearer {KEY_A}"}, {"x-api-key": KEY_A}, {"authorization": f"bearer  {KEY_A} "}):
        key = table.check(headers)
        assert (key.key_id, key.tenant, key.tier) == ("team-a-1", "team-a", "premium")
    assert presented_key({"authorization": "Basic abc", "x-api-key": "k"}) == "k"


@pytest.mark.parametrize(("headers", "message"), [
    ({}, "missing API key"),
    ({"authorization": "Bearer "}, "missing API key"),
    ({"authorization": "Bearer sk-not-a-key-at-all-0000"}, "invalid API key"),
    ({"x-api-key": KEY_B}, "API key 'batch-7' is inactive"),
])
def test_missing_unknown_and_inactive_keys_are_401(headers: dict[str, str], message: str) -> None:
    table = parse_keys_file(FILE, "keys.yaml")
    with pytest.raises(Refused, match=message) as e:
        table.check(headers)
    assert e.value.status == 401 and b'"AuthenticationError"' in e.value.body()


def test_a_key_given_in_clear_is_hashed_and_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    table = parse_keys_file(f"keys:\n- {{id: k, key: {KEY_A}, tenant: t}}\n", "keys.yaml")
    assert table.check({"x-api-key": KEY_A}).tenant == "t"
    assert "given in clear" in caplog.text
    assert all(KEY_A.encode() not in k.digest for k in table.by_digest.values())


@pytest.mark.parametrize(("text", "error"), [
    ("keys: {}", r"keys\.yaml: expected a mapping with a 'keys' list"),
    ("keys: [{id: a, tenant: t}]", r"keys\[0\]: give one of sha256 \(preferred\) or key"),
    ("keys: [{id: a, tenant: t, sha256: xyz}]", r"keys\[0\]\.sha256: expected 64 hex digits"),
    ("keys: [{id: a, tenant: t, key: short}]", r"keys\[0\]\.key: expected a string of at least 16"),
    (f"keys: [{{id: a, sha256: {sha(KEY_A)}}}]", r"keys\[0\]\.tenant: required"),
    (f"keys: [{{id: a, tenant: t, sha256: {sha(KEY_A)}, limit: 3}}]", r"keys\[0\]\.limit: unknown field"),
    (f"keys:\n- {{id: a, tenant: t, sha256: {sha(KEY_A)}}}\n- {{id: a, tenant: u, sha256: {sha(KEY_B)}}}",
     r"keys\[1\]\.id: duplicate id 'a'"),
    (f"keys:\n- {{id: a, tenant: t, sha256: {sha(KEY_A)}}}\n- {{id: b, tenant: u, key: {KEY_A}}}",
     r"two entries have the same key"),
    ("keys: [", r"keys\.yaml: invalid YAML"),
])
def test_a_bad_file_names_the_entry(text: str, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        parse_keys_file(text, "keys.yaml")


def test_rate_limits_refill_per_minute_and_tokens_are_charged_at_the_end() -> None:
    from epp.requestcontrol.ratelimits import RateLimits

    table = parse_keys_file(f"keys:\n- {{id: t, sha256: {sha(KEY_A)}, tenant: t, "
                            "limits: {requestsPerMinute: 2, tokensPerMinute: 100}}\n", "keys.yaml")
    key = table.check({"x-api-key": KEY_A})
    now = [1000.0]
    limits = RateLimits(lambda: now[0])
    limits.admit(key)
    limits.admit(key)
    with pytest.raises(Refused, match="over its 2 requests per minute") as e:
        limits.admit(key)
    assert e.value.status == 429
    got = dict(e.value.headers)
    assert got["retry-after"] == "30" and got["x-ratelimit-remaining-requests"] == "0"
    assert got["x-ratelimit-limit-requests"] == "2" and got["x-ratelimit-reset-requests"] == "1m0s"
    now[0] += 30  # one request back
    limits.admit(key)
    limits.charge(key, 150)  # one long answer: below zero
    now[0] += 30
    with pytest.raises(Refused, match="over its 100 tokens per minute") as e:
        limits.admit(key)
    assert dict(e.value.headers)["x-ratelimit-remaining-tokens"] == "0"
    now[0] += 60
    limits.admit(key)
    assert dict(limits.headers(key))["x-ratelimit-remaining-tokens"] == "100"


def test_limits_are_checked() -> None:
    with pytest.raises(ValueError, match=r"keys\[0\]\.limits\.requestsPerMinute: expected a positive integer"):
        parse_keys_file(f"keys: [{{id: a, tenant: t, sha256: {sha(KEY_A)}, limits: {{requestsPerMinute: 0}}}}]", "k")
    with pytest.raises(ValueError, match=r"keys\[0\]\.limits\.burst: unknown field"):
        parse_keys_file(f"keys: [{{id: a, tenant: t, sha256: {sha(KEY_A)}, limits: {{burst: 2}}}}]", "k")
    with pytest.raises(ValueError, match=r"keys\[0\]\.limits\.concurrency: expected a positive integer"):
        parse_keys_file(f"keys: [{{id: a, tenant: t, sha256: {sha(KEY_A)}, limits: {{concurrency: -1}}}}]", "k")
