"""Endpoint attributes from a second exposition per endpoint (the reference's DCGM data source):
each interval, GET the source's path on each endpoint's host at the source's port, and keep what
the extractor reads from it on the endpoint (``EndpointState.attributes``). A failed poll clears
the endpoint's attributes (the readers' ``onMissing`` then decides), logged once per change."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping

from epp.datastore.endpoint import EndpointState
from epp.datastore.store import Datastore
from epp.signals.httpget import KeepAliveGetter
from epp.signals.scraper import ScrapeTarget
from epp.tasks import cancel_and_wait

log = logging.getLogger("epp.attributes")
MAX_BYTES = 8 << 20  # a DCGM exposition of a big node is a few hundred KB

Extract = Callable[[str, EndpointState], Mapping[str, float]]


class AttributePoller:
    def __init__(self, store: Datastore, target: ScrapeTarget, interval: float, extract: Extract,
                 timeout: float = 1.0, on_error: Callable[[str, bool], None] | None = None) -> None:
        self.store = store
        self.target = target
        self.interval = interval
        self.extract = extract
        self.timeout = timeout
        self.on_error = on_error
        self._getters: dict[str, KeepAliveGetter] = {}
        self._failing: dict[str, str] = {}
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        await cancel_and_wait([self._task])
        self._task = None

    async def _run(self) -> None:
        while True:
            addresses = self.store.addresses()
            for gone in set(self._getters) - set(addresses):
                del self._getters[gone]
            await asyncio.gather(*(self.poll(a) for a in addresses))
            await asyncio.sleep(self.interval)

    async def poll(self, address: str) -> None:
        getter = self._getters.get(address)
        if getter is None:
            t = self.target
            getter = self._getters[address] = KeepAliveGetter(address, t.path, MAX_BYTES, t.port, t.tls)
        extracting = False
        try:
            status, body = await getter.get(self.timeout)
            if status != 200:
                raise ValueError(f"HTTP {status}")
            state = self.store.get(address)
            if state is None:
                return
            extracting = True
            values = self.extract(body.decode(errors="replace"), state)
        except Exception as e:  # whatever the source sends, this endpoint's attributes go, nothing else
            reason = f"{type(e).__name__}: {e}"
            if self._failing.get(address) != reason:
                log.warning("attribute poll of %s (port %s) failed: %s", address, self.target.port, reason)
            self._failing[address] = reason
            self.store.record_attributes(address, {})
            if self.on_error is not None:
                self.on_error(address, extracting)
            return
        self._failing.pop(address, None)
        self.store.record_attributes(address, values)
