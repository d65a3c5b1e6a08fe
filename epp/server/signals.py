"""Signal collection: each endpoint's metrics (the scraper, set up by the config's data-layer
plugins or else by the flags) and, when a plugin subscribes, its KV-cache events (one subscriber
per endpoint, whatever the number of reloads)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from epp.datastore.store import Datastore
from epp.observability.metrics import PickerMetrics
from epp.scheduling.contract import (
    AttributeExtractor,
    AttributeSource,
    DataSource,
    MetricsExtractor,
    SubscribesKVEvents,
    declares,
)
from epp.signals.attributes import AttributePoller
from epp.signals.kvevents import KVEventManager
from epp.signals.mappings import EngineMapping, single_engine
from epp.signals.scraper import Scraper, ScrapeTarget
from epp.tasks import cancel_and_wait

log = logging.getLogger("epp")


class SignalCollection:
    def __init__(self, store: Datastore, metrics: PickerMetrics, plugins: Callable[[], list[Any]], *,
                 engine: str = "vllm", interval: float = 0.05, timeout: float = 1.0, max_bytes: int,
                 max_series: int, data_layer: tuple[DataSource | None, MetricsExtractor | None] = (None, None),
                 attributes: tuple[AttributeSource, AttributeExtractor] | None = None) -> None:
        self.store = store
        self.plugins = plugins  # the current profile's plugins (a reload changes them)
        self.engine = engine
        self.interval = interval
        engines, target, every = self._scraping(data_layer)
        self.scraper = Scraper(
            store, engines, every, timeout, target,
            on_error=metrics.scrape_failed,
            on_scrape=metrics.scrape_parse.observe, max_bytes=max_bytes, max_series=max_series)
        self.kv_events = KVEventManager()
        self.timeout = timeout
        self.attributes = attributes  # a second exposition per endpoint (DCGM), when configured
        self.poller: AttributePoller | None = None
        self.on_attribute_error = metrics.attribute_poll_failed
        self._kick = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def _scraping(self, data_layer: tuple[DataSource | None, MetricsExtractor | None]
                  ) -> tuple[EngineMapping, ScrapeTarget, float]:
        source, extractor = data_layer
        engines = extractor.engine_mapping() if extractor is not None else single_engine(self.engine)
        target = source.scrape_target() if source is not None else ScrapeTarget()
        every = (source.scrape_interval() if source is not None else None) or self.interval
        return engines, target, every

    def reconfigure(self, data_layer: tuple[DataSource | None, MetricsExtractor | None],
                    attributes: tuple[AttributeSource, AttributeExtractor] | None = None) -> None:
        """A config reload: the data-layer plugins may have changed."""
        self.scraper.reconfigure(*self._scraping(data_layer))
        if attributes != self.attributes:
            self.attributes = attributes
            self._restart_poller()
        self.resync()

    def _restart_poller(self) -> None:
        old, self.poller = self.poller, None
        if old is not None:
            asyncio.get_running_loop().create_task(old.stop())
        if self.attributes is not None:
            source, extractor = self.attributes
            self.poller = AttributePoller(self.store, source.attribute_target(),
                                          source.attribute_interval() or self.interval, extractor.attributes,
                                          self.timeout, self.on_attribute_error)
            self.poller.start()

    def resync(self) -> None:
        """The endpoint set or the plugins changed: bring the KV-event subscribers in line."""
        self._kick.set()

    async def start(self) -> None:
        await self.scraper.start()
        self._restart_poller()
        self._kick.set()
        self._task = asyncio.create_task(self._kv_events_loop())

    async def _kv_events_loop(self) -> None:
        while True:
            await self._kick.wait()
            self._kick.clear()
            wanted = next((sub for p in self.plugins() if declares(p, SubscribesKVEvents)
                           for sub in [p.kv_subscription()] if sub is not None), None)
            try:
                await self.kv_events.sync(wanted[0] if wanted else None, wanted[1] if wanted else None,
                                          set(self.store.addresses()))
            except Exception:
                log.exception("KV-event subscribers could not be updated")

    async def stop(self) -> None:
        await cancel_and_wait([self._task])
        if self.poller is not None:
            await self.poller.stop()
        await self.scraper.stop()
        await self.kv_events.close()
