"""The local stacks' port allocator: distinct ports, never a bound one, none from the ephemeral range."""

from __future__ import annotations

import socket

from epp.stack.ports import PortAllocator, _ephemeral_low


def test_ports_are_never_handed_out_twice_until_the_range_wraps() -> None:
    ports = PortAllocator(start=25000)
    taken = ports.take(3) + ports.take(4) + ports.take(1)
    assert len(set(taken)) == 8
    assert all(20000 <= p < min(32000, _ephemeral_low()) for p in taken)


def test_a_port_someone_holds_is_skipped() -> None:
    probe = PortAllocator(start=26000).take(1)[0]
    with socket.socket() as held:
        held.bind(("127.0.0.1", probe))
        held.listen()
        assert probe not in PortAllocator(start=probe).take(2)


def test_the_range_wraps_back_to_its_start() -> None:
    ports = PortAllocator(low=30000, high=30100, start=30099)
    first, second = ports.take(2)
    assert 30000 <= second < first < 30100  # the second one came from the range's start
