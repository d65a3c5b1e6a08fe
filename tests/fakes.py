"""A recording asyncio transport for driving protocol objects (HTTP/2, HTTP/1.1) without sockets."""

from __future__ import annotations

from typing import Any


class FakeTransport:
    def __init__(self) -> None:
        self.data = bytearray()
        self.closed = False
        self.writes = 0

    def write(self, b: bytes) -> None:
        self.data += b
        self.writes += 1

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str) -> Any:
        return ("127.0.0.1", 5000) if name == "peername" else None

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True
