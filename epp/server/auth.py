"""Bearer-token checks for epp's own endpoints (/metrics, the epp.v1 Pick API).

The token lives in a file (a mounted Kubernetes Secret in a cluster); it is re-read when the
file changes, checked at most once a second, and compared in constant time."""

from __future__ import annotations

import hmac
import logging
import os
import time
from collections.abc import Callable

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
