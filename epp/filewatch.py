"""Watch a file: apply each valid new version; log a bad one once and keep the old state.

Polling with a content hash (not mtime) also catches Kubernetes ConfigMap updates, which swap a
symlink rather than edit the file.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Generic, TypeVar

log = logging.getLogger("epp.watch")
T = TypeVar("T")


class WatchedFile(Generic[T]):
    def __init__(self, path: str, parse: Callable[[str], T], apply: Callable[[T], None], *, what: str,
                 current: T | None = None, current_text: str | None = None, interval: float = 0.5) -> None:
        self.path = path
        self.parse = parse
        self.apply = apply
        self.what = what
        self.current = current
        self.interval = interval
        self.last_error: str | None = None
        self.reloads = 0
        self._digest = hashlib.sha256(current_text.encode()).hexdigest() if current_text is not None else ""

    def check(self) -> bool:
        """Apply the file if it changed and is valid. True when a new version was applied."""
        try:
            text = Path(self.path).read_text()
        except OSError as e:
            self._report(f"{self.path}: cannot read: {e.strerror}; keeping the previous {self.what}")
            return False
        digest = hashlib.sha256(text.encode()).hexdigest()
        if digest == self._digest:
            return False
        try:
            value = self.parse(text)
        except ValueError as e:
            self._report(f"invalid {self.what} change ignored, keeping the previous {self.what}: {e}")
            return False
        self.apply(value)
        self.current = value
        self._digest = digest
        self.last_error = None
        self.reloads += 1
        log.info("%s reloaded from %s", self.what, self.path)
        return True

    def _report(self, message: str) -> None:
        if message != self.last_error:
            log.error(message)
            self.last_error = message

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            self.check()
