"""Subscribe to one model server's KV-cache events (vLLM's ZMQ publisher) and keep an index current.

Bind or connect follows vLLM's rule for its own endpoint: vLLM BINDS ``tcp://*:P``,
``tcp://[::]:P``, ``ipc://`` and ``inproc://`` endpoints, so the subscriber connects (a wildcard
host becomes the pod's host); for ``tcp://host:P`` vLLM CONNECTS, so the subscriber binds that
address. In that case it binds an XSUB and sends the subscription itself whenever a publisher
completes its handshake: a SUB's subscription never reaches a publisher that connects later
(seen with libzmq 4.3.5 and vLLM's publisher).

Sequence numbers: each batch carries one, +1 per batch. A jump forward is a gap, refilled from
the publisher's replay socket (a ROUTER: ask [b"", start_seq], get [b"", seq, payload] ... then
[b"", -1, b""]). A jump backward means the publisher restarted (its cache is gone): the pod's
index is cleared first. Batches the replay cannot return are counted as lost, and the pod's
index is cleared rather than trusted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import msgpack
import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from epp.tasks import cancel_and_wait

log = logging.getLogger("epp.kvevents")
END_SEQ = -1


def publisher_binds(endpoint: str) -> bool:
    """vLLM's rule for its PUB socket."""
    return "*" in endpoint or "::" in endpoint or endpoint.startswith(("ipc://", "inproc://"))


def connect_address(endpoint: str, pod_host: str) -> str:
    """Where to connect for a publisher that binds ``endpoint`` on the pod ``pod_host``."""
    host = f"[{pod_host}]" if ":" in pod_host else pod_host
    return re.sub(r"^tcp://(\*|\[::\]|::)", f"tcp://{host}", endpoint)


class BlockIndex(Protocol):
    """Where the events go (the precise prefix scorer's index): blocks stored and removed per
    pod, and a pod's blocks dropped when its stream cannot be trusted."""

    def apply(self, pod: str, events: Iterable[dict[str, Any]]) -> None: ...

    def clear(self, pod: str) -> None: ...


@dataclass(frozen=True, slots=True)
class KVEventSource:
    """One pod's publisher, described as the pod's vLLM is configured (--kv-events-config)."""

    pod: str  # the pod's HTTP address (ip:port): the key the index uses
    endpoint: str
    replay_endpoint: str | None = None
    topic: str = ""

    @property
    def pod_host(self) -> str:
        return self.pod.rpartition(":")[0].strip("[]")


@dataclass(slots=True)
class SubscriberStats:
    batches: int = 0
    events: int = 0
    gaps: int = 0
    replayed: int = 0
    lost: int = 0
    restarts: int = 0
    bad: int = 0
    last_seq: int | None = None

    def add(self, other: SubscriberStats) -> None:
        """Add another subscriber's counters to these."""
        for name in COUNTERS:
            setattr(self, name, getattr(self, name) + getattr(other, name))


COUNTERS = ("batches", "events", "gaps", "replayed", "lost", "restarts", "bad")


def decode_batch(payload: bytes) -> list[dict[str, Any]]:
    """[ts, [events], dp_rank] (vLLM 0.32) -> the events (maps tagged by ``type``)."""
    batch = msgpack.unpackb(payload, strict_map_key=False)
    events = batch.get("events") if isinstance(batch, dict) else batch[1]
    if not isinstance(events, list):
        raise ValueError("batch without an event list")
    return [e for e in events if isinstance(e, dict)]


async def subscribe_on_handshake(sock: zmq.asyncio.Socket, monitor: zmq.asyncio.Socket, topic: bytes) -> None:
    """A bound XSUB: send the subscription to each publisher as it completes its handshake."""
    try:
        while True:
            event = parse_monitor_message(await monitor.recv_multipart())
            if event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                await sock.send(b"\x01" + topic)
    finally:
        monitor.close(0)


class KVEventSubscriber:
    def __init__(self, source: KVEventSource, index: BlockIndex, ctx: zmq.asyncio.Context,
                 replay_timeout: float = 2.0, on_batch: Callable[[str, int], None] | None = None) -> None:
        self.source = source
        self.index = index
        self.ctx = ctx
        self.replay_timeout = replay_timeout
        self.on_batch = on_batch
        self.stats = SubscriberStats()
        self.binds = not publisher_binds(source.endpoint)
        self._sock: zmq.asyncio.Socket | None = None
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def address(self) -> str:
        s = self.source
        return s.endpoint if self.binds else connect_address(s.endpoint, s.pod_host)

    async def start(self) -> None:
        topic = self.source.topic.encode()
        if self.binds:
            sock = self.ctx.socket(zmq.XSUB)
            monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
            sock.bind(self.address)
            self._tasks.append(asyncio.create_task(subscribe_on_handshake(sock, monitor, topic)))
        else:
            sock = self.ctx.socket(zmq.SUB)
            sock.setsockopt(zmq.SUBSCRIBE, topic)
            sock.connect(self.address)
        sock.setsockopt(zmq.LINGER, 0)
        self._sock = sock
        self._tasks.append(asyncio.create_task(self._receive(sock)))

    async def stop(self) -> None:
        await cancel_and_wait(self._tasks)
        self._tasks.clear()
        if self._sock is not None:
            if self.binds:
                with contextlib.suppress(zmq.ZMQError):
                    self._sock.disable_monitor()
            self._sock.close(0)
            self._sock = None

    async def _receive(self, sock: zmq.asyncio.Socket) -> None:
        while True:
            frames = await sock.recv_multipart()
            if len(frames) != 3:
                self.stats.bad += 1
                continue
            _, seq_bytes, payload = frames
            await self.handle(int.from_bytes(seq_bytes, "big"), payload)

    async def handle(self, seq: int, payload: bytes) -> None:
        """Apply one batch, refilling a gap (or the history, on joining late) from the replay."""
        last = self.stats.last_seq
        pod = self.source.pod
        if last is not None and seq <= last:
            self.stats.restarts += 1
            log.warning("KV events of %s restarted (seq %d after %d): clearing its blocks", pod, seq, last)
            self.index.clear(pod)
            last = None
        expected = 0 if last is None else last + 1
        if seq > expected:
            if last is not None:
                self.stats.gaps += 1
            await self._replay(expected, seq)
        self._apply(seq, payload)

    def _apply(self, seq: int, payload: bytes) -> None:
        try:
            events = decode_batch(payload)
        except (ValueError, TypeError, IndexError, msgpack.UnpackException) as e:
            self.stats.bad += 1
            log.warning("undecodable KV event batch %d from %s: %s", seq, self.source.pod, e)
            return
        self.index.apply(self.source.pod, events)
        self.stats.batches += 1
        self.stats.events += len(events)
        self.stats.last_seq = seq
        if self.on_batch is not None:
            self.on_batch(self.source.pod, seq)

    async def _replay(self, start: int, upto: int) -> None:
        """Apply batches [start, upto) from the replay socket; a missing one clears the pod."""
        replay = self.source.replay_endpoint
        got: dict[int, bytes] = {}
        if replay:
            dealer = self.ctx.socket(zmq.DEALER)
            dealer.setsockopt(zmq.LINGER, 0)
            dealer.connect(connect_address(replay, self.source.pod_host))
            try:
                await dealer.send_multipart([b"", start.to_bytes(8, "big")])
                while True:
                    async with asyncio.timeout(self.replay_timeout):
                        frames = await dealer.recv_multipart()
                    seq = int.from_bytes(frames[1], "big", signed=True)
                    if seq == END_SEQ:
                        break
                    if start <= seq < upto:
                        got[seq] = frames[2]
            except TimeoutError:
                log.warning("KV event replay from %s timed out", replay)
            finally:
                dealer.close(0)
        missing = (upto - start) - len(got)
        if missing:
            self.stats.lost += missing
            log.warning("%d KV event batches of %s are lost: clearing its blocks", missing, self.source.pod)
            self.index.clear(self.source.pod)
        for seq in sorted(got):
            self._apply(seq, got[seq])
            self.stats.replayed += 1


_PLACEHOLDER = re.compile(r"\{(ip|port)([+-]\d+)?\}")


@dataclass(frozen=True, slots=True)
class KVEventsSpec:
    """How a pool's pods publish KV events: endpoint templates with ``{ip}``, ``{port}`` and
    ``{port+N}`` (the pod's HTTP address), as each pod's ``--kv-events-config`` says."""

    endpoint: str  # "" : no per-pod subscribers (only ``shared``)
    replay_endpoint: str | None = None
    topic: str = ""
    per_pod: tuple[tuple[str, str, str | None], ...] = ()  # (pod, endpoint, replay) overriding the templates
    shared: str | None = None  # one socket epp binds for every pod's publisher (pod named in the topic)

    def source_for(self, pod: str) -> KVEventSource:
        for name, endpoint, replay in self.per_pod:
            if name == pod:
                return KVEventSource(pod, endpoint, replay, self.topic)
        host, _, port = pod.rpartition(":")
        host = host if host.startswith("[") or ":" not in host else f"[{host}]"  # ZMQ wants [v6]:port

        def fill(template: str) -> str:
            def sub(m: re.Match[str]) -> str:
                if m.group(1) == "ip":
                    return host
                return str(int(port) + int(m.group(2) or 0))
            return _PLACEHOLDER.sub(sub, template)

        replay = fill(self.replay_endpoint) if self.replay_endpoint else None
        return KVEventSource(pod, fill(self.endpoint), replay, self.topic)


def topic_pod(topic: bytes) -> str:
    """The pod a topic names: ``kv@<pod>@<model>`` (the reference's convention), else the topic."""
    text = topic.decode(errors="replace")
    parts = text.split("@")
    return parts[1] if len(parts) == 3 else text


def resolve_pod(named: str, pods: set[str]) -> str | None:
    """The pool endpoint a topic's pod id means: the address itself, or the only endpoint on that
    host (None: unknown or ambiguous)."""
    if named in pods:
        return named
    host = named.strip("[]")
    on_host = [p for p in pods if p.rpartition(":")[0].strip("[]") == host]
    return on_host[0] if len(on_host) == 1 else None


class SharedKVEventSubscriber:
    """One bound socket that every pod's publisher connects to (the reference's ``zmqEndpoint``):
    each message's topic names its pod; sequence numbers are followed per pod (a gap cannot be
    replayed here, so it clears that pod's blocks)."""

    def __init__(self, address: str, topic: str, index: BlockIndex, ctx: zmq.asyncio.Context) -> None:
        self.address = address
        self.topic = topic
        self.index = index
        self.ctx = ctx
        self.pods: set[str] = set()
        self.streams: dict[str, KVEventSubscriber] = {}
        self.unknown = 0  # messages whose topic names no endpoint of the pool
        self._sock: zmq.asyncio.Socket | None = None
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        sock = self.ctx.socket(zmq.XSUB)
        monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind(self.address)
        self._sock = sock
        self._tasks = [asyncio.create_task(subscribe_on_handshake(sock, monitor, self.topic.encode())),
                       asyncio.create_task(self._receive(sock))]

    async def stop(self) -> None:
        await cancel_and_wait(self._tasks)
        self._tasks.clear()
        if self._sock is not None:
            with contextlib.suppress(zmq.ZMQError):
                self._sock.disable_monitor()
            self._sock.close(0)
            self._sock = None

    def set_pods(self, pods: set[str]) -> None:
        for pod in set(self.streams) - pods:
            del self.streams[pod]
        self.pods = pods

    async def _receive(self, sock: zmq.asyncio.Socket) -> None:
        while True:
            frames = await sock.recv_multipart()
            if len(frames) != 3:
                continue
            pod = resolve_pod(topic_pod(frames[0]), self.pods)
            if pod is None:
                self.unknown += 1
                continue
            stream = self.streams.get(pod)
            if stream is None:
                stream = self.streams[pod] = KVEventSubscriber(KVEventSource(pod, self.address), self.index, self.ctx)
            await stream.handle(int.from_bytes(frames[1], "big"), frames[2])

    def stats(self) -> SubscriberStats:
        t = SubscriberStats()
        for s in self.streams.values():
            t.add(s.stats)
        return t


class KVEventManager:
    """One subscriber per pod of the pool, kept in step with the datastore's endpoints (and the
    shared socket, when the spec has one)."""

    def __init__(self, ctx: zmq.asyncio.Context | None = None) -> None:
        self.ctx = ctx or zmq.asyncio.Context()
        self._own_ctx = ctx is None
        self.spec: KVEventsSpec | None = None
        self.index: BlockIndex | None = None
        self.subscribers: dict[str, KVEventSubscriber] = {}
        self.shared: SharedKVEventSubscriber | None = None
        self.retired = SubscriberStats()  # totals of subscribers that were stopped

    async def sync(self, spec: KVEventsSpec | None, index: BlockIndex | None, pods: set[str]) -> None:
        """Subscribe to ``pods`` for ``index`` (stop everything when spec or index is None)."""
        if spec != self.spec or index is not self.index:
            for pod in list(self.subscribers):
                await self._stop(pod)
            await self._stop_shared()
            self.spec, self.index = spec, index
        if spec is None or index is None:
            return
        if spec.shared and self.shared is None:
            shared = SharedKVEventSubscriber(spec.shared, spec.topic, index, self.ctx)
            try:
                await shared.start()
                self.shared = shared
            except zmq.ZMQError as e:
                log.warning("cannot bind the shared KV-event socket %s: %s", spec.shared, e)
        if self.shared is not None:
            for pod in set(self.shared.pods) - pods:
                index.clear(pod)
            self.shared.set_pods(pods)
        for pod in set(self.subscribers) - pods:
            await self._stop(pod)
            index.clear(pod)
        if not spec.endpoint:
            return
        for pod in sorted(pods - set(self.subscribers)):
            sub = KVEventSubscriber(spec.source_for(pod), index, self.ctx)
            try:
                await sub.start()
            except zmq.ZMQError as e:
                log.warning("cannot subscribe to KV events of %s at %s: %s", pod, sub.address, e)
                continue
            self.subscribers[pod] = sub

    async def _stop(self, pod: str) -> None:
        sub = self.subscribers.pop(pod)
        await sub.stop()
        self.retired.add(sub.stats)

    async def _stop_shared(self) -> None:
        if self.shared is not None:
            await self.shared.stop()
            self.retired.add(self.shared.stats())
            self.shared = None

    def totals(self) -> SubscriberStats:
        t = SubscriberStats()
        t.add(self.retired)
        if self.shared is not None:
            t.add(self.shared.stats())
        for sub in self.subscribers.values():
            t.add(sub.stats)
        return t

    async def close(self) -> None:
        await self.sync(None, None, set())
        if self._own_ctx:
            self.ctx.term()
