"""Leader election on a coordination.k8s.io/v1 Lease (``--ha-enable-leader-election``).

Every replica serves ext_proc; only the leader reports ready, as the reference does, so the
gateway sends traffic to one replica and the others stand by warm (scraping, watching, KV
events), ready to take over. The protocol is client-go's: read the Lease; take it when it is
free or its holder has not renewed within ``leaseDurationSeconds``; renew every
``retry_period``; every write carries the resourceVersion read, so of two racing replicas one
gets 409 Conflict and backs off. A leader that cannot renew within ``renew_deadline`` steps
down before its lease can expire under it; on a clean shutdown it releases the lease so a
standby takes over at once instead of after the lease duration.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp

from epp.tasks import cancel_and_wait

log = logging.getLogger("epp.leader")


def _now() -> datetime:
    return datetime.now(UTC)


def _fmt(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse(text: str | None) -> datetime | None:
    if not text:
        return None
    with contextlib.suppress(ValueError):
        return datetime.fromisoformat(text.replace("Z", "+00:00"))
    return None


def default_identity() -> str:
    return f"{os.environ.get('POD_NAME') or socket.gethostname()}_{uuid.uuid4().hex[:8]}"


class LeaderElector:
    def __init__(self, api: Any, namespace: str, name: str, identity: str | None = None, *,
                 lease_duration: float = 15.0, renew_deadline: float = 10.0, retry_period: float = 2.0,
                 on_change: Callable[[bool], None] | None = None) -> None:
        from kubernetes_asyncio import client as k8s_client

        self.coord = k8s_client.CoordinationV1Api(api)
        self.namespace = namespace
        self.name = name
        self.identity = identity or default_identity()
        self.lease_duration = lease_duration
        self.renew_deadline = renew_deadline
        self.retry_period = retry_period
        self.on_change = on_change
        self.is_leader = False
        self.transitions = 0
        self._last_renew = 0.0
        self._task: asyncio.Task[None] | None = None

    # -- API calls (raw JSON, so the Lease's fields are exactly what is sent) -----------------------
    async def _read(self) -> dict[str, Any] | None:
        from kubernetes_asyncio.client.exceptions import ApiException

        from epp.datastore.kubernetes import read_json

        try:
            resp = await self.coord.read_namespaced_lease(self.name, self.namespace, _preload_content=False)
            lease: dict[str, Any] = await read_json(resp)
        except ApiException as e:
            if e.status == 404:
                return None
            raise
        return lease

    def _body(self, current: dict[str, Any] | None, holder: str | None, renew: datetime) -> dict[str, Any]:
        spec = dict((current or {}).get("spec") or {})
        previous = spec.get("holderIdentity")
        if holder != previous and holder is not None:
            spec["acquireTime"] = _fmt(renew)
            spec["leaseTransitions"] = int(spec.get("leaseTransitions") or 0) + (1 if current else 0)
        spec["holderIdentity"] = holder
        spec["renewTime"] = _fmt(renew)
        spec["leaseDurationSeconds"] = max(1, round(self.lease_duration))
        meta: dict[str, Any] = {"name": self.name, "namespace": self.namespace}
        if current is not None:
            meta["resourceVersion"] = current["metadata"]["resourceVersion"]
        return {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": meta, "spec": spec}

    async def try_acquire_or_renew(self) -> bool:
        """One round of the protocol; True when this replica holds the lease afterwards."""
        from kubernetes_asyncio.client.exceptions import ApiException

        now = _now()
        current = await self._read()
        if current is not None:
            spec = current.get("spec") or {}
            holder = spec.get("holderIdentity")
            renewed = _parse(spec.get("renewTime"))
            duration = float(spec.get("leaseDurationSeconds") or self.lease_duration)
            held_by_other = holder not in (None, "", self.identity)
            if held_by_other and renewed is not None and renewed + timedelta(seconds=duration) > now:
                return False
        from epp.datastore.kubernetes import read_json

        try:
            if current is None:
                await read_json(await self.coord.create_namespaced_lease(
                    self.namespace, self._body(None, self.identity, now), _preload_content=False))
            else:
                await read_json(await self.coord.replace_namespaced_lease(
                    self.name, self.namespace, self._body(current, self.identity, now), _preload_content=False))
        except ApiException as e:
            if e.status in (409, 422):  # another replica wrote first
                return False
            raise
        return True

    def _set(self, leader: bool) -> None:
        if leader != self.is_leader:
            self.is_leader = leader
            self.transitions += 1
            log.warning("%s %s the leader (lease %s/%s)", self.identity, "is now" if leader else "is no longer",
                        self.namespace, self.name)
            if self.on_change is not None:
                self.on_change(leader)

    async def run(self) -> None:
        from kubernetes_asyncio.client.exceptions import ApiException

        loop = asyncio.get_running_loop()
        while True:
            try:
                # A hung API call must not stall the election: each round gets the renew deadline.
                async with asyncio.timeout(max(self.renew_deadline, self.retry_period)):
                    held = await self.try_acquire_or_renew()
                if held:
                    self._last_renew = loop.time()
                self._set(held)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the loop must outlive any error: an elector that died never leads again
                level = logging.WARNING if isinstance(e, ApiException | aiohttp.ClientError | OSError | TimeoutError
                                                      | KeyError | ValueError) else logging.ERROR
                log.log(level, "lease %s/%s: %s: %s", self.namespace, self.name, type(e).__name__, str(e)[:200])
                if self.is_leader and loop.time() - self._last_renew > self.renew_deadline:
                    self._set(False)  # step down before the lease can expire under us
            await asyncio.sleep(self.retry_period)

    def start(self) -> None:
        self._task = asyncio.create_task(self.run())

    async def stop(self, release: bool = True) -> None:
        await cancel_and_wait([self._task])
        self._task = None
        if release and self.is_leader:
            from epp.datastore.kubernetes import read_json

            with contextlib.suppress(Exception):
                current = await self._read()
                if current is not None and (current.get("spec") or {}).get("holderIdentity") == self.identity:
                    body = self._body(current, None, _now())
                    body["spec"]["leaseDurationSeconds"] = 1
                    body["spec"]["renewTime"] = _fmt(_now() - timedelta(seconds=self.lease_duration))
                    await read_json(await self.coord.replace_namespaced_lease(self.name, self.namespace, body,
                                                                              _preload_content=False))
        self._set(False)
