"""Where the pool comes from: the endpoint set and the request policies.

Endpoints: a static list (--endpoints), a watched file (--endpoints-file), or InferencePool
discovery in Kubernetes, which also brings InferenceObjective and InferenceModelRewrite objects;
outside Kubernetes those come from a watched file (--objectives-file).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from epp.datastore.sources import EndpointList, endpoints_watcher
from epp.datastore.store import Datastore
from epp.filewatch import WatchedFile
from epp.requestcontrol.policies import RequestPolicies, parse_policy_file
from epp.tasks import cancel_and_wait

if TYPE_CHECKING:  # kubernetes_asyncio takes ~0.5 s to import: only when discovery is used
    from epp.datastore.kubernetes import KubernetesDiscovery, KubernetesOptions


class PoolSources:
    def __init__(self, store: Datastore, set_policies: Callable[[RequestPolicies], None], *,
                 endpoints: tuple[str, ...] = (), endpoints_file: str | None = None,
                 objectives_file: str | None = None, kubernetes: KubernetesOptions | None = None,
                 poll_interval: float = 0.5, watch_endpoints_file: bool = True) -> None:
        self.store = store
        self.set_policies = set_policies
        self.endpoints = endpoints
        self.endpoints_file = endpoints_file
        self.watch_endpoints_file = watch_endpoints_file  # file-discovery's watchFile (the flag's file: always)
        self._file_task: asyncio.Task[Any] | None = None
        self.objectives_file = objectives_file
        self.kubernetes = kubernetes
        self.poll_interval = poll_interval
        self.endpoints_watcher: WatchedFile[EndpointList] | None = None
        self.policies_watcher: WatchedFile[RequestPolicies] | None = None
        self.discovery: KubernetesDiscovery | None = None
        self._tasks: list[asyncio.Task[Any]] = []

    def synced(self) -> bool:
        """The endpoint set is known: always outside Kubernetes, once listed with discovery."""
        return self.discovery is None or self.discovery.has_synced()

    async def start(self) -> None:
        if self.endpoints:
            self.store.set_endpoints(self.endpoints)
        if self.endpoints_file:
            self._read_endpoints_file()
        if self.objectives_file:
            path = self.objectives_file
            self.policies_watcher = WatchedFile(path, lambda t: parse_policy_file(t, path), self.set_policies,
                                                what="objectives and rewrites", interval=self.poll_interval)
            self.policies_watcher.check()
            self._tasks.append(asyncio.create_task(self.policies_watcher.run()))
        kube = self.kubernetes
        if kube is not None:
            pool, group = kube.pool_name, kube.pool_group

            def policies_changed(objects: list[dict[str, Any]]) -> None:
                self.set_policies(RequestPolicies.build(objects, pool, pool_group=group))

            self.discovery = await kube.discovery(self.store, policies_changed)
            await self.discovery.start()

    def _read_endpoints_file(self) -> None:
        assert self.endpoints_file is not None
        self.endpoints_watcher = endpoints_watcher(self.endpoints_file, self.store, self.poll_interval)
        self.endpoints_watcher.check()
        if self.watch_endpoints_file:
            self._file_task = asyncio.create_task(self.endpoints_watcher.run())

    async def use_endpoints_file(self, path: str, watch: bool) -> None:
        """A reload changed dataLayer.discovery's file (or its watchFile): read that one now."""
        if (path, watch) == (self.endpoints_file, self.watch_endpoints_file):
            return
        await cancel_and_wait([self._file_task])
        self._file_task = None
        self.endpoints_file, self.watch_endpoints_file = path, watch
        self._read_endpoints_file()

    async def stop(self) -> None:
        await cancel_and_wait([*self._tasks, self._file_task])
        if self.discovery is not None:
            await self.discovery.stop()
