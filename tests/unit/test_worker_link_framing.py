"""The worker link's framing: messages in order, a long turn's batch written in parts."""

from __future__ import annotations

import asyncio
from typing import Any

import msgpack

from epp.server.workerlink import FLUSH_EVERY, _Link
from tests.fakes import FakeTransport


class Recording(_Link):
    def __init__(self) -> None:
        super().__init__()
        self.got: list[Any] = []

    def on_message(self, message: Any) -> None:
        self.got.append(message)


async def test_a_batch_goes_out_every_flush_every_messages_and_the_rest_at_the_end_of_the_turn() -> None:
    sender, t = Recording(), FakeTransport()
    sender.connection_made(t)  # type: ignore[arg-type]
    sent = [["p", i, {"k": "v" * (i % 5)}] for i in range(2 * FLUSH_EVERY + 3)]
    for i, m in enumerate(sent):
        sender.send(m)
        assert t.writes == (i + 1) // FLUSH_EVERY  # the other end starts on each part at once
    await asyncio.sleep(0)
    assert t.writes == 3  # the last three at the end of the turn
    receiver = Recording()
    receiver.data_received(bytes(t.data))
    assert receiver.got == sent
    sender.send(["c", 1])  # a later turn: flushed at its end again
    await asyncio.sleep(0)
    assert t.writes == 4 and bytes(t.data).endswith(msgpack.packb(["c", 1]))
