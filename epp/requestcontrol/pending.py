"""A request whose outcome comes later (flow control holds it, or its token ids are being
fetched): the front end sets ``ready`` (called once, with the Routed or the Refused) and calls
``cancel`` if its client goes away first."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from epp.request import InferenceRequest
    from epp.requestcontrol.refused import Refused
    from epp.requestcontrol.routed import Routed


class Pending:
    __slots__ = ("ready", "request", "result")

    def __init__(self, request: InferenceRequest) -> None:
        self.request = request
        self.ready: Callable[[Routed | Refused], None] | None = None
        self.result: Routed | Refused | None = None  # set when it ended before ``ready`` was set

    def deliver(self, result: Routed | Refused) -> None:
        if self.ready is not None:
            self.ready(result)
        else:
            self.result = result

    def cancel(self) -> None:
        raise NotImplementedError


class Preparing(Pending):
    """A request whose token ids are being fetched (the token producer's render): then it goes
    on as any request (admission, flow control, scheduling); ``cancel`` stops whichever step it
    is in."""

    __slots__ = ("_next", "_task")

    def __init__(self, request: InferenceRequest) -> None:
        super().__init__(request)
        self._task: asyncio.Task[None] | None = None
        self._next: Pending | None = None  # flow control holds it after the ids came

    def start(self, work: Coroutine[Any, Any, None]) -> None:
        self._task = asyncio.get_running_loop().create_task(work)

    def then(self, held: Pending) -> None:
        """Flow control holds the request now: its outcome is this one's."""
        self._next = held
        if held.result is not None:
            self.deliver(held.result)
        else:
            held.ready = self.deliver

    def cancel(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self._next is not None:
            self._next.cancel()
