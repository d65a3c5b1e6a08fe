"""Active-active replicas share what only a picker knows, through Valkey or Redis.

Every ``interval`` each replica makes one pipelined round trip to the store:

- its own load (epp.datastore.peers.ReplicaLoad: per endpoint in flight, prompt tokens not yet
  prefilled, picks since the last scrape; its waiting room's size) becomes its field of the hash
  ``<key>:load``, and the hash's fields are read back: the datastore's counters become this
  replica's own plus the others', and flow control's pool caps count the others' rooms;
- what its approximate prefix indexes recorded since the last round goes to the stream
  ``<key>:prefix`` (trimmed to about ``stream_length`` entries), and what the others appended
  since the last read is recorded in the same plugins here (matched by plugin name and block size).

Staleness is bounded: while the store answers, a peer's numbers are at most two intervals and a
round trip old; a peer whose load stops moving for ``staleness`` is dropped (a replica that stops
cleanly removes its own field at once). When the store cannot be reached the replica logs it once,
sets ``epp_shared_state_up`` to 0, keeps serving, and ``staleness`` later routes on its own state
alone; when the store is back it says so and shares again (what was recorded meanwhile is not
replayed). What the pods publish (metrics, KV events) is read by each replica itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import struct
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import msgpack
from prometheus_client import CollectorRegistry, Counter, Gauge

from epp.datastore.peers import PeerFormatError, PeerLoads, ReplicaLoad
from epp.datastore.store import Datastore
from epp.flowcontrol.controller import FlowController
from epp.scheduling.contract import SharesPrefixIndex, declares

log = logging.getLogger("epp.sharedstate")

WARM_ENTRIES = 20_000  # prefix-stream entries a starting replica reads to warm its index
READ_BATCH = 1_000


@dataclass(frozen=True, slots=True)
class SharedStateOptions:
    url: str  # redis://[:password@]host:port/db, rediss:// for TLS, unix:///path
    key: str = "epp:default"
    interval: float = 0.05
    staleness: float = 1.0
    timeout: float = 0.5  # per round trip (connect included)
    stream_length: int = 100_000
    replica: str = ""  # this replica's name among them ("": host, pid and a random part)


def replica_id() -> str:
    """This process's name among the replicas: its host (the pod's name in Kubernetes), pid and a
    random part, so a restarted replica is a new one."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(2)}"


def pack_records(plugin: str, block_tokens: int, records: Iterable[tuple[str, list[int]]]) -> list[Any]:
    return [plugin, block_tokens, [[e, struct.pack(f"<{len(h)}Q", *h)] for e, h in records]]


def unpack_records(entry: Any) -> tuple[str, int, list[tuple[str, list[int]]]]:
    """One packed entry of the prefix stream; ValueError when it is not one."""
    try:
        plugin, block, packed = entry
        records = [(str(e), list(struct.unpack(f"<{len(h) // 8}Q", h))) for e, h in packed]
        return str(plugin), int(block), records
    except (TypeError, ValueError, struct.error) as e:
        raise ValueError(f"bad prefix records: {e!r}") from None


class SharedStateMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.up = Gauge("epp_shared_state_up", "1 while the shared-state store answers (active-active replicas).",
                        registry=registry)
        self.peers = Gauge("epp_shared_state_peers", "Other replicas whose load this replica counts.",
                           registry=registry)
        self.errors = Counter("epp_shared_state_errors_total", "Round trips to the shared-state store that failed.",
                              registry=registry)
        self.records = Counter("epp_shared_state_prefix_records_total",
                               "Prefix-index records shared with other replicas, by direction.", ["direction"],
                               registry=registry)
        self.sent, self.received = self.records.labels("sent"), self.records.labels("received")


class SharedState:
    """The replica's side of the shared state (one task)."""

    def __init__(self, opts: SharedStateOptions, store: Datastore, plugins: Callable[[], list[Any]],
                 flow: Callable[[], FlowController | None], registry: CollectorRegistry,
                 clock: Callable[[], float] = time.monotonic) -> None:
        import redis.asyncio as aioredis  # imported only for active-active

        self.opts = opts
        self.me = opts.replica or replica_id()
        self.store = store
        self.plugins = plugins
        self.flow = flow
        self.clock = clock
        self.metrics = SharedStateMetrics(registry)
        self.peers = PeerLoads(self.me, opts.staleness)
        self.client: Any = aioredis.Redis.from_url(opts.url, socket_timeout=opts.timeout,
                                                   socket_connect_timeout=opts.timeout, retry_on_timeout=False)
        self.load_key, self.stream_key = f"{opts.key}:load", f"{opts.key}:prefix"
        self.up: bool | None = None  # None: not tried yet
        self.rounds = 0
        self._seq = 0
        self._last_id: bytes | None = None  # the prefix stream read so far (None: not warmed yet)
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._bad_peers: set[str] = set()

    # -- lifecycle ----------------------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self.run())

    async def stop(self) -> None:
        self._stopping = True  # (the loop ends by itself too, should a cancellation get lost in a call)
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait({self._task}, timeout=self.opts.interval + 2 * self.opts.timeout)
        # Peers drop this replica at once rather than after `staleness` (the store may be gone).
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.client.hdel(self.load_key, self.me), self.opts.timeout)
        await self.client.aclose()

    async def run(self) -> None:
        interval = self.opts.interval
        while not self._stopping:
            started = self.clock()
            try:
                # (asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that
                # comes as the call completes, and the loop would never end)
                async with asyncio.timeout(self.opts.timeout):
                    await self.sync()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # any failure of the store is an outage, not a crash
                self._down(e)
            else:
                if self.up is not True:
                    log.info("shared state: %s through %s, %d other replicas", "sharing again" if self.up is False
                             else "sharing", self._where(), len(self.peers.replicas()))
                self.up = True
                self.metrics.up.set(1)
            self._publish_peers()
            await asyncio.sleep(max(0.0, interval - (self.clock() - started)))

    def _where(self) -> str:
        url = self.opts.url
        return url.rpartition("@")[2] if "@" in url else url  # never the password

    def _down(self, error: BaseException) -> None:
        self.metrics.errors.inc()
        self.metrics.up.set(0)
        if self.up is not False:
            why = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
            log.warning("shared state: the store at %s is unreachable (%s); routing on this replica's state "
                        "alone after %.1fs, until it answers", self._where(), why, self.opts.staleness)
        self.up = False
        for p in self._sharing():  # what was recorded while down is not kept for later
            p.take_prefix_records()
        self._last_id = None  # warm again from the stream when it is back

    # -- one round ------------------------------------------------------------------------------------
    def _sharing(self) -> list[Any]:
        return [p for p in self.plugins() if declares(p, SharesPrefixIndex)]

    def own_load(self) -> ReplicaLoad:
        s = self.store
        self._seq += 1
        flow = self.flow()
        queued, nbytes = (flow.queues.totals.count, flow.queues.totals.nbytes) if flow is not None else (0, 0)
        return ReplicaLoad(self.me, self._seq, {a: n for a, n in s.own_inflight.items() if n},
                           dict(s.own_tokens), {a: n for a, n in s.own_recent.items() if n > 0}, queued, nbytes)

    async def sync(self) -> None:
        """One round trip: publish this replica's load and records, read the others'."""
        c, o = self.client, self.opts
        if self._last_id is None:
            await self._warm()
        entries = []
        sent = 0
        for p in self._sharing():
            block, records = p.take_prefix_records()
            if records:
                entries.append(pack_records(p.name, block, records))
                sent += len(records)
        pipe = c.pipeline(transaction=False)
        pipe.hset(self.load_key, self.me, self.own_load().encode())
        pipe.pexpire(self.load_key, int(max(o.staleness * 10, 60) * 1000))
        pipe.hgetall(self.load_key)
        if entries:
            pipe.xadd(self.stream_key, {"r": self.me, "d": msgpack.packb(entries)}, maxlen=o.stream_length,
                      approximate=True)
        pipe.xread({self.stream_key: self._last_id}, count=READ_BATCH)
        results = await pipe.execute()
        self.metrics.sent.inc(sent)
        self._take_loads(results[2])
        self._take_records(results[-1])
        self.rounds += 1

    async def _warm(self) -> None:
        """Start reading the prefix stream: its last ``WARM_ENTRIES`` entries are recorded first."""
        newest = await self.client.xrevrange(self.stream_key, count=WARM_ENTRIES)
        self._last_id = newest[0][0] if newest else b"0-0"
        self._apply([(i, f) for i, f in reversed(newest)])

    def _take_loads(self, fields: dict[bytes, bytes]) -> None:
        loads = []
        for name, raw in fields.items():
            try:
                loads.append(ReplicaLoad.decode(raw))
            except PeerFormatError as e:
                replica = name.decode(errors="replace")
                if replica not in self._bad_peers:  # once per replica
                    self._bad_peers.add(replica)
                    log.warning("shared state: ignoring replica %r's load in %s: %s", replica, self.load_key, e)
        self.peers.update(loads, self.clock())

    def _take_records(self, streams: list[Any] | None) -> None:
        for _key, items in streams or ():
            if items:
                self._last_id = items[-1][0]
                self._apply(items)

    def _apply(self, items: Iterable[tuple[bytes, dict[bytes, bytes]]]) -> None:
        plugins = {p.name: p for p in self._sharing()}
        known = self.store.get
        received = 0
        me = self.me.encode()
        for _id, f in items:
            if f.get(b"r") == me:
                continue
            try:
                entries = msgpack.unpackb(f[b"d"])
                unpacked = [unpack_records(e) for e in entries]
            except (KeyError, ValueError, msgpack.UnpackException) as e:
                log.debug("shared state: skipping a prefix entry: %s", e)
                continue
            for plugin, block, records in unpacked:
                p = plugins.get(plugin)
                if p is None:
                    continue
                kept = [(e, h) for e, h in records if known(e) is not None]
                p.add_peer_prefix_records(block, kept)
                received += len(kept)
        self.metrics.received.inc(received)

    def _publish_peers(self) -> None:
        """Hand the peers' totals to the datastore and flow control (dropping silent peers)."""
        self.peers.expire(self.clock())
        totals = self.peers.totals()
        self.store.set_peer_load(totals)
        flow = self.flow()
        if flow is not None:
            flow.elsewhere = (totals.queued, totals.queued_bytes)
        self.metrics.peers.set(totals.replicas)
