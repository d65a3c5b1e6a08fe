"""The pool's models: each model server's ``GET /v1/models``, polled, merged by id.

Entries (the base model, its served names, loaded LoRA adapters with their ``parent``) are
merged across pods: the first pod to list an id gives its fields, ``created`` is the earliest.
A pod that stops answering keeps its last listing until it leaves the pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import orjson

from epp.datastore.store import Datastore
from epp.signals.httpget import HTTPGetError, KeepAliveGetter

log = logging.getLogger("epp.models")
MAX_LISTING = 1024 * 1024  # bytes of one pod's /v1/models answer


class ModelCatalog:
    def __init__(self, store: Datastore, interval: float = 30.0, timeout: float = 2.0) -> None:
        self.store = store
        self.interval, self.timeout = interval, timeout
        self.by_endpoint: dict[str, list[dict[str, Any]]] = {}
        self._getters: dict[str, KeepAliveGetter] = {}
        self._task: asyncio.Task[None] | None = None
        self.polled = asyncio.Event()  # set after the first round

    def listing(self) -> list[dict[str, Any]]:
        merged: dict[str, dict[str, Any]] = {}
        for address in sorted(self.by_endpoint):
            for entry in self.by_endpoint[address]:
                seen = merged.get(entry["id"])
                if seen is None:
                    merged[entry["id"]] = dict(entry)
                elif isinstance(entry.get("created"), int) and isinstance(seen.get("created"), int):
                    seen["created"] = min(seen["created"], entry["created"])
        return [merged[k] for k in sorted(merged)]

    async def poll_once(self) -> None:
        addresses = set(self.store.addresses())
        for gone in set(self._getters) - addresses:
            self._getters.pop(gone).close()
            self.by_endpoint.pop(gone, None)
        for a in addresses - set(self._getters):
            self._getters[a] = KeepAliveGetter(a, "/v1/models", max_body=MAX_LISTING)
        await asyncio.gather(*(self._poll(a, g) for a, g in list(self._getters.items())))
        self.polled.set()

    async def _poll(self, address: str, getter: KeepAliveGetter) -> None:
        try:
            status, body = await getter.get(self.timeout)
            if status != 200:
                raise HTTPGetError(f"status {status}")
            data = orjson.loads(body).get("data")
            if not isinstance(data, list):
                raise HTTPGetError("no 'data' list")
            self.by_endpoint[address] = [e for e in data if isinstance(e, dict) and isinstance(e.get("id"), str)]
        except (TimeoutError, HTTPGetError, OSError, orjson.JSONDecodeError, AttributeError) as e:
            log.debug("GET /v1/models of %s failed: %s", address, e)

    async def _run(self) -> None:
        while True:
            await self.poll_once()
            await asyncio.sleep(self.interval)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for g in self._getters.values():
            g.close()
        self._getters.clear()
