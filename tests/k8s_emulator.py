"""An in-process Kubernetes API server emulator that speaks the real REST list/watch protocol.

No real API server can run on these machines, so discovery and leader election are tested
against this: JSON lists with ``metadata.resourceVersion``; watches as chunked HTTP streams of
newline-delimited JSON events (ADDED / MODIFIED / DELETED / BOOKMARK / ERROR) resumed from a
``resourceVersion``; ``allowWatchBookmarks``; ``timeoutSeconds``; a compacted history so an old
resourceVersion gets the 410 Gone ERROR event real servers send; equality label selectors and
``metadata.name`` field selectors; create / replace with resourceVersion conflicts (409) for
Leases. Tests drive it (add pods, drop watches, compact) and a real client library talks to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

CORE = ("", "v1")


@dataclass
class _Event:
    rv: int
    type: str
    obj: dict[str, Any]


@dataclass
class _Collection:
    objects: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)  # (ns, name) -> object
    events: list[_Event] = field(default_factory=list)
    compacted: int = 0  # events with rv <= this are gone from the history


def _truthy(value: str | None) -> bool:
    """Go's strconv.ParseBool, as the API server parses query booleans."""
    return value in ("1", "t", "T", "TRUE", "true", "True")


def _matches_labels(obj: dict[str, Any], selector: str | None) -> bool:
    if not selector:
        return True
    labels = obj.get("metadata", {}).get("labels") or {}
    for term in selector.split(","):
        term = term.strip()
        if not term:
            continue
        if "!=" in term:
            k, v = term.split("!=", 1)
            if labels.get(k) == v:
                return False
        elif "=" in term:
            k, v = term.split("==", 1) if "==" in term else term.split("=", 1)
            if labels.get(k) != v:
                return False
        elif labels.get(term) is None:
            return False
    return True


def _matches_fields(obj: dict[str, Any], selector: str | None) -> bool:
    if not selector:
        return True
    for term in selector.split(","):
        k, _, v = term.partition("=")
        if k == "metadata.name" and obj["metadata"]["name"] != v:
            return False
        if k == "metadata.namespace" and obj["metadata"].get("namespace") != v:
            return False
    return True


class KubeEmulator:
    def __init__(self, bookmark_interval: float = 0.5) -> None:
        self.rv = 100
        self.bookmark_interval = bookmark_interval
        self.collections: dict[tuple[str, str, str], _Collection] = {}  # (group, version, plural)
        self._changed = asyncio.Condition()
        self._runner: web.AppRunner | None = None
        self._watch_responses: set[web.StreamResponse] = set()
        self.port = 0
        self.requests: list[str] = []  # "GET /api/v1/...?..." for assertions
        self.watch_count = 0
        self.list_count = 0
        self.fail_next: list[int] = []  # statuses to answer the next requests with
        self.cleanups: list[Any] = []  # async callables a test registers (clients to close)
        self.authorizations: set[str] = set()  # Authorization headers seen
        self.not_served: set[str] = set()  # plurals answered 404, as for a CRD that is not installed
        # TokenReview: bearer token -> (user, groups); SubjectAccessReview: users allowed, as
        # {(user, verb, non-resource path)}.
        self.tokens: dict[str, tuple[str, list[str]]] = {}
        self.allowed: set[tuple[str, str, str]] = set()
        self.reviews: list[str] = []  # "tokenreview" / "subjectaccessreview", for assertions

    # -- test controls -------------------------------------------------------------------------
    def _coll(self, group: str, version: str, plural: str) -> _Collection:
        return self.collections.setdefault((group, version, plural), _Collection())

    async def apply(self, group: str, version: str, plural: str, obj: dict[str, Any]) -> dict[str, Any]:
        """Create or replace an object (as a controller would), recording the event."""
        coll = self._coll(group, version, plural)
        meta = obj.setdefault("metadata", {})
        key = (meta.get("namespace", ""), meta["name"])
        self.rv += 1
        meta["resourceVersion"] = str(self.rv)
        meta.setdefault("uid", f"uid-{meta['name']}-{self.rv}")
        meta.setdefault("creationTimestamp", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        kind = "MODIFIED" if key in coll.objects else "ADDED"
        coll.objects[key] = copy.deepcopy(obj)
        coll.events.append(_Event(self.rv, kind, copy.deepcopy(obj)))
        await self._notify()
        return obj

    async def delete(self, group: str, version: str, plural: str, namespace: str, name: str) -> None:
        coll = self._coll(group, version, plural)
        obj = coll.objects.pop((namespace, name))
        self.rv += 1
        obj["metadata"]["resourceVersion"] = str(self.rv)
        coll.events.append(_Event(self.rv, "DELETED", obj))
        await self._notify()

    def compact(self) -> None:
        """Forget the history: watches resuming from before now get 410 Gone."""
        for coll in self.collections.values():
            coll.compacted = self.rv
            coll.events.clear()

    async def drop_watches(self) -> None:
        """Cut every open watch mid-stream (an API server restart, a load balancer timeout)."""
        for resp in list(self._watch_responses):
            with contextlib.suppress(Exception):
                if resp.task is not None:
                    resp.task.cancel()
        self._watch_responses.clear()

    def get(self, group: str, version: str, plural: str, namespace: str, name: str) -> dict[str, Any] | None:
        obj = self._coll(group, version, plural).objects.get((namespace, name))
        return copy.deepcopy(obj) if obj else None

    def write_kubeconfig(self, path: Any, namespace: str = "default") -> str:
        """A kubeconfig file pointing at this emulator (token auth, as a real one would carry)."""
        config = {"apiVersion": "v1", "kind": "Config", "current-context": "emu",
                  "clusters": [{"name": "emu", "cluster": {"server": f"http://127.0.0.1:{self.port}"}}],
                  "users": [{"name": "u", "user": {"token": "t0ken"}}],
                  "contexts": [{"name": "emu", "context": {"cluster": "emu", "user": "u", "namespace": namespace}}]}
        with open(path, "w") as f:
            json.dump(config, f)  # JSON is YAML
        return str(path)

    async def _token_review(self, request: web.Request) -> web.Response:
        """TokenReview: authenticated when the token is one of ``tokens``."""
        self.reviews.append("tokenreview")
        review = await request.json()
        found = self.tokens.get((review.get("spec") or {}).get("token", ""))
        status: dict[str, Any] = {"authenticated": found is not None}
        if found is not None:
            status["user"] = {"username": found[0], "groups": found[1]}
        return web.json_response({**review, "status": status}, status=201)

    async def _access_review(self, request: web.Request) -> web.Response:
        """SubjectAccessReview of a non-resource URL: allowed when (user, verb, path) is in ``allowed``."""
        self.reviews.append("subjectaccessreview")
        review = await request.json()
        spec = review.get("spec") or {}
        nra = spec.get("nonResourceAttributes") or {}
        allowed = (spec.get("user"), nra.get("verb"), nra.get("path")) in self.allowed
        return web.json_response({**review, "status": {"allowed": allowed}}, status=201)

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    # -- server --------------------------------------------------------------------------------
    async def start(self, tls: tuple[bytes, bytes] | None = None) -> str:
        """Serve on 127.0.0.1 (HTTPS with ``tls`` = (key PEM, cert PEM), as in a cluster)."""
        app = web.Application(middlewares=[self._remember_auth])
        app.router.add_route("*", "/api/{version}/namespaces/{ns}/{plural}", self._collection_core)
        app.router.add_route("*", "/api/{version}/namespaces/{ns}/{plural}/{name}", self._object_core)
        app.router.add_post("/apis/authentication.k8s.io/v1/tokenreviews", self._token_review)
        app.router.add_post("/apis/authorization.k8s.io/v1/subjectaccessreviews", self._access_review)
        app.router.add_route("*", "/apis/{group}/{version}/namespaces/{ns}/{plural}", self._collection)
        app.router.add_route("*", "/apis/{group}/{version}/namespaces/{ns}/{plural}/{name}", self._object)
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        ssl_ctx = None
        if tls is not None:
            import ssl
            import tempfile

            ssl_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            with tempfile.TemporaryDirectory() as d:
                key, crt = Path(d) / "tls.key", Path(d) / "tls.crt"
                key.write_bytes(tls[0])
                crt.write_bytes(tls[1])
                ssl_ctx.load_cert_chain(str(crt), str(key))
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=ssl_ctx)
        await site.start()
        server = getattr(site, "_server", None)
        self.port = server.sockets[0].getsockname()[1] if server is not None else 0
        return f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"

    @web.middleware
    async def _remember_auth(self, request: web.Request, handler: Any) -> web.StreamResponse:
        self.authorizations.add(request.headers.get("Authorization", ""))
        result: web.StreamResponse = await handler(request)
        return result

    async def stop(self) -> None:
        await self.drop_watches()
        if self._runner is not None:
            await self._runner.cleanup()

    def _status(self, code: int, reason: str, message: str) -> web.Response:
        body = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
                "reason": reason, "code": code}
        return web.json_response(body, status=code)

    async def _collection_core(self, request: web.Request) -> web.StreamResponse:
        return await self._handle_collection(request, "", request.match_info["version"])

    async def _collection(self, request: web.Request) -> web.StreamResponse:
        return await self._handle_collection(request, request.match_info["group"], request.match_info["version"])

    async def _object_core(self, request: web.Request) -> web.StreamResponse:
        return await self._handle_object(request, "", request.match_info["version"])

    async def _object(self, request: web.Request) -> web.StreamResponse:
        return await self._handle_object(request, request.match_info["group"], request.match_info["version"])

    def _injected_failure(self) -> web.Response | None:
        if self.fail_next:
            code = self.fail_next.pop(0)
            return self._status(code, "InternalError" if code >= 500 else "Failure", f"injected {code}")
        return None

    async def _handle_collection(self, request: web.Request, group: str, version: str) -> web.StreamResponse:
        self.requests.append(f"{request.method} {request.path_qs}")
        failure = self._injected_failure()
        if failure is not None:
            return failure
        ns, plural = request.match_info["ns"], request.match_info["plural"]
        if plural in self.not_served:
            return self._status(404, "NotFound", "the server could not find the requested resource")
        coll = self._coll(group, version, plural)
        if request.method == "POST":
            obj = await request.json()
            obj.setdefault("metadata", {})["namespace"] = ns
            if (ns, obj["metadata"]["name"]) in coll.objects:
                return self._status(409, "AlreadyExists", f'{plural} "{obj["metadata"]["name"]}" already exists')
            return web.json_response(await self.apply(group, version, plural, obj), status=201)
        q = request.query
        labels, fields = q.get("labelSelector"), q.get("fieldSelector")

        def selected(obj: dict[str, Any]) -> bool:
            return _matches_labels(obj, labels) and _matches_fields(obj, fields)

        if _truthy(q.get("watch")):
            return await self._watch(request, coll, ns, selected)
        self.list_count += 1
        items = [copy.deepcopy(o) for (ons, _), o in sorted(coll.objects.items()) if ons == ns and selected(o)]
        kind = plural[:-1].capitalize() + "List"
        return web.json_response({"kind": kind, "apiVersion": f"{group}/{version}".strip("/"),
                                  "metadata": {"resourceVersion": str(self.rv)}, "items": items})

    async def _watch(self, request: web.Request, coll: _Collection, ns: str, selected: Any) -> web.StreamResponse:
        q = request.query
        self.watch_count += 1
        resp = web.StreamResponse(headers={"content-type": "application/json"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        self._watch_responses.add(resp)
        timeout = float(q.get("timeoutSeconds") or 1800)
        deadline = time.monotonic() + timeout
        bookmarks = _truthy(q.get("allowWatchBookmarks"))

        async def send(kind: str, obj: dict[str, Any]) -> None:
            await resp.write(json.dumps({"type": kind, "object": obj}).encode() + b"\n")

        try:
            rv_param = q.get("resourceVersion")
            if not rv_param or rv_param == "0":
                last = self.rv
                for (ons, _), o in sorted(coll.objects.items()):
                    if ons == ns and selected(o):
                        await send("ADDED", o)
            else:
                last = int(rv_param)
                if last < coll.compacted:
                    await send("ERROR", {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                                         "message": f"too old resource version: {last} ({coll.compacted})",
                                         "reason": "Expired", "code": 410})
                    return resp
            next_bookmark = time.monotonic() + self.bookmark_interval
            while time.monotonic() < deadline:
                seen_rv = self.rv  # every event up to here is in coll.events (appended in order)
                for ev in coll.events:
                    if ev.rv > last:
                        last = ev.rv
                        if ev.obj["metadata"].get("namespace", "") == ns and selected(ev.obj):
                            await send(ev.type, ev.obj)
                now = time.monotonic()
                if bookmarks and now >= next_bookmark:
                    last = max(last, seen_rv)
                    await send("BOOKMARK", {"kind": "", "apiVersion": "", "metadata": {"resourceVersion": str(last)}})
                    next_bookmark = now + self.bookmark_interval
                # asyncio.timeout, not wait_for: on 3.11 a handler cancelled (its client gone) just
                # as wait_for's inner wait() completes can lose the cancel and keep the condition's
                # lock, and every later write then hangs in _notify after it has been applied.
                async with self._changed:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(min(0.1, max(0.0, deadline - now))):
                            await self._changed.wait()
            await resp.write_eof()
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self._watch_responses.discard(resp)
        return resp

    async def _handle_object(self, request: web.Request, group: str, version: str) -> web.StreamResponse:
        self.requests.append(f"{request.method} {request.path_qs}")
        failure = self._injected_failure()
        if failure is not None:
            return failure
        ns, plural, name = request.match_info["ns"], request.match_info["plural"], request.match_info["name"]
        coll = self._coll(group, version, plural)
        current = coll.objects.get((ns, name))
        if request.method == "GET":
            if current is None:
                return self._status(404, "NotFound", f'{plural} "{name}" not found')
            return web.json_response(current)
        if request.method == "PUT":
            obj = await request.json()
            if current is None:
                return self._status(404, "NotFound", f'{plural} "{name}" not found')
            sent_rv = obj.get("metadata", {}).get("resourceVersion")
            if sent_rv and sent_rv != current["metadata"]["resourceVersion"]:
                return self._status(409, "Conflict", f'Operation cannot be fulfilled on {plural} "{name}": the '
                                    "object has been modified; please apply your changes to the latest version")
            obj["metadata"]["namespace"] = ns
            return web.json_response(await self.apply(group, version, plural, obj))
        if request.method == "DELETE":
            if current is None:
                return self._status(404, "NotFound", f'{plural} "{name}" not found')
            await self.delete(group, version, plural, ns, name)
            return web.json_response(current)
        return self._status(405, "MethodNotAllowed", request.method)
