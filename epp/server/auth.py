"""Bearer-token checks for epp's own endpoints (/metrics, the epp.v1 Pick API).

A token in a file (a mounted Kubernetes Secret in a cluster) is re-read when the file changes,
checked at most once a second, and compared in constant time. In a cluster /metrics can instead
ask the API server (TokenReview + SubjectAccessReview), as the reference does."""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import time
from collections.abc import Callable
from typing import Any, Protocol

log = logging.getLogger("epp.auth")


class TokenFile:
    """The expected bearer token, from ``path`` (surrounding whitespace ignored)."""

    def __init__(self, path: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.path = path
        self.clock = clock
        self._token = b""
        self._stamp: tuple[float, int] | None = None
        self._checked = float("-inf")
        self._load()
        if not self._token:
            raise ValueError(f"{path}: the token file is empty")

    def _load(self) -> None:
        try:
            st = os.stat(self.path)
            stamp = (st.st_mtime, st.st_size)
            if stamp != self._stamp:
                with open(self.path, "rb") as f:
                    token = f.read().strip()
                if token:
                    self._token = token
                self._stamp = stamp
        except OSError as e:
            if not self._token:
                raise ValueError(f"{self.path}: cannot read the token file: {e.strerror}") from None
            log.warning("%s: cannot re-read the token file (%s); keeping the previous token", self.path, e.strerror)

    def allows(self, authorization: str | None) -> bool:
        """True for ``Bearer <token>`` with the file's token."""
        now = self.clock()
        if now - self._checked >= 1.0:
            self._checked = now
            self._load()
        if not authorization:
            return False
        scheme, _, given = authorization.strip().partition(" ")
        if scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(given.strip().encode(), self._token)


# HTTP statuses an authorizer answers with.
ALLOWED, UNAUTHENTICATED, FORBIDDEN, UNAVAILABLE = 200, 401, 403, 503


class Authorizer(Protocol):
    """Who may read an endpoint: ``authorize`` returns ALLOWED, UNAUTHENTICATED, FORBIDDEN or
    UNAVAILABLE (the check itself failed)."""

    async def authorize(self, authorization: str | None) -> int: ...


class TokenFileAuthorizer:
    def __init__(self, token: TokenFile) -> None:
        self.token = token

    async def authorize(self, authorization: str | None) -> int:
        return ALLOWED if self.token.allows(authorization) else UNAUTHENTICATED


def bearer(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, given = authorization.strip().partition(" ")
    return given.strip() or None if scheme.lower() == "bearer" else None


class KubernetesReviews:
    """The reference's in-cluster /metrics authentication: the bearer token is checked with a
    TokenReview, then its user with a SubjectAccessReview (``get`` on the non-resource URL
    ``path``), as controller-runtime's metrics filter does; what Prometheus needs is the usual
    ClusterRole with ``nonResourceURLs: [/metrics]``. Answers are cached for ``ttl`` seconds
    per token (by its hash), at most ``max_entries`` of them; a failed review is not cached."""

    def __init__(self, api: Any, path: str = "/metrics", ttl: float = 60.0, max_entries: int = 1024,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.api = api
        self.path = path
        self.ttl = ttl
        self.max_entries = max_entries
        self.clock = clock
        self._cache: dict[bytes, tuple[float, int]] = {}

    async def authorize(self, authorization: str | None) -> int:
        token = bearer(authorization)
        if token is None:
            return UNAUTHENTICATED
        key = hashlib.sha256(token.encode()).digest()
        now = self.clock()
        hit = self._cache.get(key)
        if hit is not None and now - hit[0] < self.ttl:
            return hit[1]
        try:
            answer = await self._review(token)
        except Exception as e:  # the API is down or refuses epp: say so, do not cache
            log.warning("metrics authentication: the review failed: %s", e)
            return UNAVAILABLE
        if len(self._cache) >= self.max_entries:
            self._cache.clear()
        self._cache[key] = (now, answer)
        return answer

    async def _review(self, token: str) -> int:
        from kubernetes_asyncio import client as k8s

        review = await k8s.AuthenticationV1Api(self.api).create_token_review(
            k8s.V1TokenReview(spec=k8s.V1TokenReviewSpec(token=token)))
        status = review.status
        if status is None or not status.authenticated or status.user is None:
            return UNAUTHENTICATED
        access = await k8s.AuthorizationV1Api(self.api).create_subject_access_review(
            k8s.V1SubjectAccessReview(spec=k8s.V1SubjectAccessReviewSpec(
                user=status.user.username, groups=status.user.groups, uid=status.user.uid,
                non_resource_attributes=k8s.V1NonResourceAttributes(path=self.path, verb="get"))))
        return ALLOWED if access.status is not None and access.status.allowed else FORBIDDEN
