"""Kubernetes discovery: an InferencePool (or a label selector) and the Ready pods it selects.

Client: kubernetes-asyncio. It rides on aiohttp (the scraper's stack: no second HTTP client),
loads both in-cluster config and kubeconfig files, and exposes the list/watch protocol as it
is: resourceVersion, allowWatchBookmarks, server timeouts, and a 410 Gone surfaced to the
caller. (lightkube was considered: on 410 its watch restarts without a resourceVersion instead
of relisting, so deletions during the gap are missed, and it cannot ask for bookmarks.)

Each watched kind runs a reflector: LIST (remember the list's resourceVersion) then WATCH from
it with bookmarks, resuming from the last version seen after a server timeout or a dropped
connection (with backoff), and relisting on 410 Gone. A relist replaces the whole cache, so
nothing deleted during a gap survives, and endpoints are recomputed from the cache each time,
so reconnects never duplicate or leak endpoints.

Endpoints: one ``ip:port`` per Ready, non-terminating pod with an IP, per target port; the pod
annotation ``inference.networking.k8s.io/active-ports`` narrows the ports.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import random
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

import aiohttp
from kubernetes_asyncio import client as k8s_client
from kubernetes_asyncio import config as k8s_config
from kubernetes_asyncio import watch as k8s_watch
from kubernetes_asyncio.client.exceptions import ApiException

from epp.datastore.store import Datastore

log = logging.getLogger("epp.kubernetes")

POOL_GROUP = "inference.networking.k8s.io"
POOL_VERSION = "v1"
POOL_PLURAL = "inferencepools"
# The pod annotation that narrows its ports: the reference's current name first, then the older one.
ACTIVE_PORTS = ("llm-d.ai/active-ports", "inference.networking.k8s.io/active-ports")
# InferenceObjective / InferenceModelRewrite: the reference's current group, and the older one.
POLICY_SOURCES = (("llm-d.ai", "v1alpha2"), ("inference.networking.x-k8s.io", "v1alpha2"))
POLICY_PLURALS = ("inferenceobjectives", "inferencemodelrewrites")
SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
NAMESPACE_FILE = f"{SERVICE_ACCOUNT_DIR}/namespace"


class PoolError(ValueError):
    """An InferencePool whose spec epp cannot use (the message names the field)."""


@dataclass(frozen=True, slots=True)
class PoolSpec:
    selector: tuple[tuple[str, str], ...]
    target_ports: tuple[int, ...]
    app_protocol: str | None = None
    failure_mode: str | None = None

    @property
    def label_selector(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self.selector)

    @classmethod
    def parse(cls, obj: dict[str, Any]) -> PoolSpec:
        """Read an InferencePool (inference.networking.k8s.io/v1)."""
        spec = obj.get("spec")
        if not isinstance(spec, dict):
            raise PoolError("spec: missing")
        sel = spec.get("selector")
        labels = sel.get("matchLabels") if isinstance(sel, dict) else None
        if not isinstance(labels, dict) or not labels or not all(isinstance(v, str) for v in labels.values()):
            raise PoolError("spec.selector.matchLabels: expected a non-empty map of strings")
        ports_raw = spec.get("targetPorts")
        if not isinstance(ports_raw, list) or not 1 <= len(ports_raw) <= 8:
            raise PoolError("spec.targetPorts: expected 1 to 8 entries")
        ports = []
        for i, p in enumerate(ports_raw):
            n = p.get("number") if isinstance(p, dict) else None
            if isinstance(n, bool) or not isinstance(n, int) or not 0 < n < 65536:
                raise PoolError(f"spec.targetPorts[{i}].number: expected a port number, got {n!r}")
            ports.append(n)
        if len(set(ports)) != len(ports):
            raise PoolError("spec.targetPorts: duplicate port numbers")
        ref = spec.get("endpointPickerRef")
        mode = ref.get("failureMode") if isinstance(ref, dict) else None
        return cls(tuple(sorted(labels.items())), tuple(ports), spec.get("appProtocol"), mode)


def pod_endpoints(pod: dict[str, Any], ports: tuple[int, ...]) -> list[str]:
    """``ip:port`` for each port a Ready, non-terminating pod serves (none otherwise)."""
    meta = pod.get("metadata") or {}
    status = pod.get("status") or {}
    if meta.get("deletionTimestamp"):
        return []
    ip = status.get("podIP")
    ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or ())
    if not ip or not ready:
        return []
    annotations = meta.get("annotations") or {}
    active = next((annotations[k] for k in ACTIVE_PORTS if k in annotations), None)
    if active:
        wanted = {int(p) for p in active.split(",") if p.strip().isdigit()}
        ports = tuple(p for p in ports if p in wanted)
    host = f"[{ip}]" if ":" in ip else ip
    return [f"{host}:{p}" for p in ports]


Lister = Callable[..., Awaitable[Any]]


async def read_json(resp: Any) -> Any:
    """The body of a raw (``_preload_content=False``) response; ApiException for an error status,
    as the client raises when it decodes the response itself."""
    try:
        if resp.status >= 400:
            text = await resp.text()
            raise ApiException(status=resp.status, reason=text[:300])
        return await resp.json()
    finally:
        resp.release()


class Reflector:
    """LIST + WATCH of one kind into ``objects`` (name -> raw object); ``on_change`` after each change."""

    def __init__(self, what: str, lister: Lister, on_change: Callable[[], None], *, label_selector: str | None = None,
                 field_selector: str | None = None, watch_timeout: int = 300, backoff: tuple[float, float] = (0.2, 5.0),
                 missing_ok: bool = False) -> None:
        self.what = what
        self.lister = lister
        self.on_change = on_change
        self.kwargs: dict[str, Any] = {}
        if label_selector:
            self.kwargs["label_selector"] = label_selector
        if field_selector:
            self.kwargs["field_selector"] = field_selector
        self.watch_timeout = watch_timeout
        self.backoff = backoff
        self.objects: dict[str, dict[str, Any]] = {}
        self.resource_version: str | None = None
        self.synced = asyncio.Event()
        self.relists = 0
        self.reconnects = 0
        self.missing_ok = missing_ok  # an optional kind (CRD not installed): wait quietly

    async def run(self) -> None:
        delay = self.backoff[0]
        while True:
            try:
                if self.resource_version is None:
                    await self._list()
                await self._watch()
                delay = self.backoff[0]  # a server-side timeout: resume at once
            except ApiException as e:
                if e.status == 410:
                    log.info("%s: watch expired (410 Gone): relisting", self.what)
                    self.resource_version = None
                    continue
                if e.status == 404 and self.missing_ok:
                    if not self.synced.is_set():
                        log.info("%s: not served by this cluster (CRD not installed?); checking every 30s",
                                 self.what)
                        self.synced.set()
                    await asyncio.sleep(30)
                    continue
                log.warning("%s: API error %s %s; retrying in %.1fs", self.what, e.status, e.reason, delay)
                await self._sleep(delay)
                delay = min(delay * 2, self.backoff[1])
            except (aiohttp.ClientError, OSError, TimeoutError) as e:
                self.reconnects += 1
                log.warning("%s: watch interrupted (%s); resuming in %.1fs", self.what, type(e).__name__, delay)
                await self._sleep(delay)
                delay = min(delay * 2, self.backoff[1])
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a malformed answer must not end discovery: relist after a pause
                log.error("%s: unexpected answer (%s: %s); relisting in %.1fs", self.what, type(e).__name__,
                          str(e)[:200], delay)
                self.resource_version = None
                await self._sleep(delay)
                delay = min(delay * 2, self.backoff[1])

    async def _sleep(self, delay: float) -> None:
        await asyncio.sleep(delay * (0.8 + 0.4 * random.random()))

    async def _list(self) -> None:
        data = await read_json(await self.lister(**self.kwargs, _preload_content=False))
        self.objects = {o["metadata"]["name"]: o for o in data.get("items") or ()}
        self.resource_version = data["metadata"]["resourceVersion"]
        self.relists += 1
        self.synced.set()
        self.on_change()

    async def _watch(self) -> None:
        w = k8s_watch.Watch(return_type="object")
        try:
            stream = w.stream(self.lister, resource_version=self.resource_version, allow_watch_bookmarks=True,
                              timeout_seconds=self.watch_timeout, **self.kwargs)
            async for event in stream:
                kind, obj = event["type"], event["raw_object"]
                rv = (obj.get("metadata") or {}).get("resourceVersion")
                if kind == "BOOKMARK":
                    self.resource_version = rv or self.resource_version
                    continue
                name = obj["metadata"]["name"]
                if kind == "DELETED":
                    self.objects.pop(name, None)
                else:
                    self.objects[name] = obj
                self.resource_version = rv or self.resource_version
                self.on_change()
        finally:
            await w.close()


def _namespace(explicit: str | None) -> str:
    if explicit:
        return explicit
    env = os.environ.get("POD_NAMESPACE")
    if env:
        return env
    with contextlib.suppress(OSError), open(NAMESPACE_FILE) as f:
        return f.read().strip() or "default"
    return "default"


async def api_client(kubeconfig: str | None = None, service_account_dir: str = SERVICE_ACCOUNT_DIR,
                     environ: Mapping[str, str] | None = None) -> k8s_client.ApiClient:
    """In-cluster config when running in a pod (unless a kubeconfig is given): the API server from
    KUBERNETES_SERVICE_HOST/PORT, the service account's token and CA; else the kubeconfig."""
    from kubernetes_asyncio.config.incluster_config import InClusterConfigLoader

    env = os.environ if environ is None else environ
    conf = k8s_client.Configuration()
    if kubeconfig is None and env.get("KUBERNETES_SERVICE_HOST"):
        InClusterConfigLoader(token_filename=f"{service_account_dir}/token",
                              cert_filename=f"{service_account_dir}/ca.crt",
                              environ=dict(env)).load_and_set(conf)
    else:
        await k8s_config.load_kube_config(config_file=kubeconfig, client_configuration=conf)
    return k8s_client.ApiClient(conf)


@dataclass(frozen=True, slots=True)
class KubernetesOptions:
    """What ``epp serve`` was told to discover."""

    namespace: str | None = None
    pool_name: str | None = None
    pool_group: str = POOL_GROUP
    selector: str | None = None
    target_ports: tuple[int, ...] = ()
    kubeconfig: str | None = None
    leader_election: bool = False
    lease_name: str | None = None  # default: epp-<pool name>
    lease_duration: float = 15.0
    renew_deadline: float = 10.0
    retry_period: float = 2.0

    @property
    def lease(self) -> str:
        return self.lease_name or f"epp-{self.pool_name or 'pods'}"

    async def discovery(self, store: Datastore,
                        on_policies: Callable[[list[dict[str, Any]]], None] | None = None) -> KubernetesDiscovery:
        api = await api_client(self.kubeconfig)
        return KubernetesDiscovery(api, store, self.namespace, pool_name=self.pool_name, pool_group=self.pool_group,
                                   selector=self.selector, target_ports=self.target_ports, on_policies=on_policies)


class KubernetesDiscovery:
    """Keeps ``store``'s endpoints equal to the pool's (or the selector's) Ready pods x ports."""

    def __init__(self, api: k8s_client.ApiClient, store: Datastore, namespace: str | None = None, *,
                 pool_name: str | None = None, pool_group: str = POOL_GROUP, selector: str | None = None,
                 target_ports: tuple[int, ...] = (), watch_timeout: int = 300,
                 on_policies: Callable[[list[dict[str, Any]]], None] | None = None) -> None:
        if pool_name is None and not (selector and target_ports):
            raise ValueError("Kubernetes discovery needs --pool-name, or --endpoint-selector with "
                             "--endpoint-target-ports")
        self.api = api
        self.store = store
        self.namespace = _namespace(namespace)
        self.pool_name = pool_name
        self.pool_group = pool_group
        self.watch_timeout = watch_timeout
        self.spec: PoolSpec | None = None
        if pool_name is None:
            labels = tuple(sorted(tuple(t.split("=", 1)) for t in (selector or "").split(",") if "=" in t))
            self.spec = PoolSpec(labels, target_ports)  # type: ignore[arg-type]
        self.pool: Reflector | None = None
        self.pods: Reflector | None = None
        self._pods_task: asyncio.Task[None] | None = None
        self._pool_task: asyncio.Task[None] | None = None
        self.pool_error: str | None = None
        self.on_policies = on_policies
        self.policy_reflectors: list[Reflector] = []
        self._policy_tasks: list[asyncio.Task[None]] = []

    def has_synced(self) -> bool:
        """The pool (if any) and its pods have been listed once: the endpoint set is known."""
        if self.pool is not None and not self.pool.synced.is_set():
            return False
        return self.pods is not None and self.pods.synced.is_set()

    async def start(self) -> None:
        if self.pool_name is not None:
            custom = k8s_client.CustomObjectsApi(self.api)
            lister = partial(custom.list_namespaced_custom_object, self.pool_group, POOL_VERSION, self.namespace,
                             POOL_PLURAL)
            self.pool = Reflector(f"inferencepool {self.namespace}/{self.pool_name}", lister, self._pool_changed,
                                  field_selector=f"metadata.name={self.pool_name}", watch_timeout=self.watch_timeout)
            self._pool_task = asyncio.create_task(self.pool.run())
            if self.on_policies is not None:
                for (group, version), plural in itertools.product(POLICY_SOURCES, POLICY_PLURALS):
                    lister = partial(custom.list_namespaced_custom_object, group, version, self.namespace, plural)
                    r = Reflector(f"{plural}.{group} {self.namespace}", lister, self._policies_changed,
                                  watch_timeout=self.watch_timeout, missing_ok=True)
                    self.policy_reflectors.append(r)
                    self._policy_tasks.append(asyncio.create_task(r.run()))
        else:
            self._start_pods()

    def _start_pods(self) -> None:
        if self._pods_task is not None:
            self._pods_task.cancel()
            self._pods_task = None
        self.pods = None
        if self.spec is None:
            self._recompute()
            return
        core = k8s_client.CoreV1Api(self.api)
        lister = partial(core.list_namespaced_pod, self.namespace)
        self.pods = Reflector(f"pods {self.namespace} [{self.spec.label_selector}]", lister, self._recompute,
                              label_selector=self.spec.label_selector, watch_timeout=self.watch_timeout)
        self._pods_task = asyncio.create_task(self.pods.run())

    def _pool_changed(self) -> None:
        assert self.pool is not None
        obj = self.pool.objects.get(self.pool_name or "")
        spec: PoolSpec | None = None
        if obj is None:
            if self.spec is not None:
                log.warning("InferencePool %s/%s is gone: no endpoints", self.namespace, self.pool_name)
            self.pool_error = "not found"
        else:
            try:
                spec = PoolSpec.parse(obj)
                self.pool_error = None
            except PoolError as e:
                self.pool_error = str(e)
                log.error("InferencePool %s/%s: %s; keeping the previous endpoints", self.namespace, self.pool_name, e)
                return
        if spec == self.spec:
            return
        old_selector = self.spec.selector if self.spec else None
        self.spec = spec
        if spec is None or spec.selector != old_selector:
            self._start_pods()  # a new selector needs a new pod watch
        else:
            self._recompute()  # same pods, other ports

    def _policies_changed(self) -> None:
        if self.on_policies is None:
            return
        objects = [o for r in self.policy_reflectors for o in r.objects.values()]
        self.on_policies(objects)

    def _recompute(self) -> None:
        spec, pods = self.spec, self.pods
        labels: dict[str, dict[str, str]] = {}  # endpoint -> its pod's labels
        names: dict[str, str] = {}  # endpoint -> namespace/pod-rank-N, as the reference names it
        if spec is not None and pods is not None:
            for pod in pods.objects.values():
                meta = pod.get("metadata") or {}
                pod_labels = meta.get("labels") or {}
                for address in pod_endpoints(pod, spec.target_ports):
                    labels[address] = {k: v for k, v in pod_labels.items() if isinstance(v, str)}
                    rank = spec.target_ports.index(int(address.rpartition(":")[2]))
                    names[address] = f"{meta.get('namespace') or self.namespace}/{meta.get('name', '')}-rank-{rank}"
        self.store.set_endpoints(sorted(labels), labels, names)

    async def stop(self) -> None:
        for t in (self._pool_task, self._pods_task, *self._policy_tasks):
            if t is not None:
                t.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await t
        await self.api.close()
