"""Free ports for local stacks, below the kernel's ephemeral range and never handed out twice.

Asking the kernel for port 0 and closing the socket races twice: the next ask may get the same port
back before the first caller binds it, and an outgoing connection may take it as its ephemeral
source port. Ports from here come from a range outgoing connections do not use, in order, starting
at an offset from the process id (so two test processes rarely meet), each checked by binding it.
"""

from __future__ import annotations

import os
import socket
import threading

LOW, HIGH = 20000, 32000  # below Linux's default ephemeral range (32768-60999)


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


class PortAllocator:
    """Hands out bindable ports from [low, high) in turn; a port comes back only after the range wraps."""

    def __init__(self, low: int = LOW, high: int = HIGH, start: int | None = None) -> None:
        high = min(high, _ephemeral_low())
        if high - low < 100:
            raise ValueError(f"port range {low}-{high} is too small")
        self._low, self._span = low, high - low
        self._next = (os.getpid() * 7919 if start is None else start - low) % self._span
        self._lock = threading.Lock()

    def take(self, n: int = 1) -> list[int]:
        """``n`` distinct ports that were free when checked."""
        out: list[int] = []
        with self._lock:
            for _ in range(self._span):
                if len(out) == n:
                    break
                port = self._low + self._next
                self._next = (self._next + 1) % self._span
                if _bindable(port):
                    out.append(port)
        if len(out) < n:
            raise OSError(f"no {n} free ports in {self._low}-{self._low + self._span}")
        return out


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True
