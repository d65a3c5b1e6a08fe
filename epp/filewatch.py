"""Watch a file: apply each valid new version; log a bad one once and keep the old state.

Polling with a content hash (not mtime) also catches Kubernetes ConfigMap updates, which swap a
symlink rather than edit the file. With ``offload`` the parse (which may load files, e.g. a
config's tokenizer) runs in a thread, so the event loop keeps routing meanwhile; ``apply``
always runs on the loop.
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
                 current: T | None = None, current_text: str | None = None, interval: float = 0.5,
                 offload: bool = False) -> None:
        self.path = path
        self.offload = offload
        self.parse = parse
        self.apply = apply
        self.what = what
        self.current = current
        self.interval = interval
        self.last_error: str | None = None
        self.reloads = 0
        self.rejected = 0
        self._bad_digest = ""
        self._digest = hashlib.sha256(current_text.encode()).hexdigest() if current_text is not None else ""

    def check(self) -> bool:
        """Apply the file if it changed and is valid. True when a new version was applied."""
        changed = self._changed()
        if changed is None:
            return False
        digest, data = changed
        parsed = self._parse(digest, data)
        return parsed is not None and self._apply(digest, parsed[0])

    async def check_async(self) -> bool:
        """``check``, with the parse in a thread when ``offload``."""
        if not self.offload:
            return self.check()
        changed = self._changed()
        if changed is None:
            return False
        digest, data = changed
        parsed = await asyncio.to_thread(self._parse, digest, data)
        return parsed is not None and self._apply(digest, parsed[0])

    def _changed(self) -> tuple[str, bytes] | None:
        try:
            data = Path(self.path).read_bytes()
        except OSError as e:
            self._report(f"{self.path}: cannot read: {e.strerror}; keeping the previous {self.what}")
            return None
        digest = hashlib.sha256(data).hexdigest()
        if digest in (self._digest, self._bad_digest):
            return None
        return digest, data

    def _parse(self, digest: str, data: bytes) -> tuple[T] | None:
        try:
            return (self.parse(data.decode("utf-8")),)
        except UnicodeDecodeError as e:
            self._reject(digest, f"{self.path}: not UTF-8 text (byte {e.start})")
        except ValueError as e:
            self._reject(digest, str(e))
        except Exception as e:  # a parser bug must not end the watch: later edits still apply
            log.debug("parsing %s failed", self.path, exc_info=True)
            self._reject(digest, f"{self.path}: {type(e).__name__}: {e}")
        return None

    def _apply(self, digest: str, value: T) -> bool:
        try:
            self.apply(value)
        except Exception as e:
            log.exception("applying the new %s from %s failed; keeping the previous %s", self.what, self.path,
                          self.what)
            self._reject(digest, f"{self.path}: cannot apply: {type(e).__name__}: {e}")
            return False
        self.current = value
        self._digest = digest
        self.last_error = None
        self.reloads += 1
        log.info("%s reloaded from %s", self.what, self.path)
        return True

    def _reject(self, digest: str, reason: str) -> None:
        """Log a bad version once (until the file changes again) and keep the current state."""
        self.rejected += 1
        self._bad_digest = digest  # not parsed again until the file changes
        self._report(f"invalid {self.what} change ignored, keeping the previous {self.what}: {reason}")

    def _report(self, message: str) -> None:
        if message != self.last_error:
            log.error(message)
            self.last_error = message

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.check_async()
            except Exception:  # check() catches what it knows; nothing may end the watch
                log.exception("watching %s failed; will retry", self.path)
