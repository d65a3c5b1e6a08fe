"""The plugin contract: what a filter, scorer or picker is, and the hooks it may take part in.

A plugin class declares its role and its hooks by subclassing them (``class MyScorer(Scorer,
ObservesPicks)``); nothing is probed by name. ``epp.scheduling.registry`` checks the
declaration when the type is registered (each declared hook implemented with its signature, no
hook-named method left undeclared), and the scheduler resolves the hooks once per profile.

Every plugin is built as ``cls(name, params)`` from its config entry: it reads its parameters
with ``params`` (strict: an unread parameter is an error) and does no I/O. A plugin that needs
files (a tokenizer) declares ``LoadsResources``: ``load()`` runs once per build, off the event
loop, before the plugin serves. Plugins never do I/O on the pick path.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from epp.datastore.endpoint import EndpointState
from epp.datastore.store import Snapshot
from epp.request import InferenceRequest
from epp.scheduling.types import Completion, CycleState, Decision, PrefixMatch, Slot

if TYPE_CHECKING:
    from prometheus_client.core import Metric

    from epp.signals.kvevents import BlockIndex, KVEventsSpec
    from epp.signals.mappings import EngineMapping
    from epp.signals.scraper import ScrapeTarget


class Plugin(Protocol):
    """Every plugin: its config type name, its instance name, and the cycle slots it writes and
    reads (a consumer runs after the producers of what it reads)."""

    type_name: ClassVar[str]
    name: str
    produces: ClassVar[tuple[Slot[Any], ...]] = ()
    consumes: ClassVar[tuple[Slot[Any], ...]] = ()


# -- roles: a plugin has exactly one ----------------------------------------------------------------
class Filter(Plugin, Protocol):
    """Narrows the candidates before scoring; returning none refuses the request (503)."""

    def filter(self, request: InferenceRequest, snapshot: Snapshot, candidates: list[EndpointState],
               cycle: CycleState) -> list[EndpointState]: ...


class Scorer(Plugin, Protocol):
    """One score in [0, 1] per candidate (higher is better); the profile weights it."""

    def score(self, request: InferenceRequest, snapshot: Snapshot, candidates: list[EndpointState],
              cycle: CycleState) -> list[float]: ...


class Picker(Plugin, Protocol):
    """Chooses the primary endpoint and fallbacks (indexes into ``candidates``, best first)."""

    max_endpoints: int

    def pick(self, candidates: list[EndpointState], totals: list[float]) -> list[int]: ...


class ProfileHandler(Plugin, Protocol):
    """Chooses the scheduling profile (epp runs one; the reference's type is accepted)."""


class DataSource(Plugin, Protocol):
    """Where the endpoints' metrics are read from (data layer; listed under plugins only)."""

    def scrape_target(self) -> ScrapeTarget: ...

    def scrape_interval(self) -> float | None: ...


class AttributeSource(Plugin, Protocol):
    """A second exposition per endpoint, polled for attributes (the reference's DCGM source;
    data layer, under plugins only; its extractor reads it)."""

    def attribute_target(self) -> ScrapeTarget: ...

    def attribute_interval(self) -> float | None: ...


class AttributeExtractor(Plugin, Protocol):
    """Reads an attribute source's exposition into endpoint attributes ("Attribute/type" ->
    value), for the filters and scorers that name them."""

    def attributes(self, text: str, endpoint: EndpointState) -> Mapping[str, float]: ...


class EndpointDiscovery(Plugin, Protocol):
    """Where the endpoints come from, named by ``dataLayer.discovery`` (the reference's
    ``file-discovery``): a file of endpoints, and whether it is watched."""

    def endpoints_file(self) -> tuple[str, bool]: ...


class EndpointNotifier(Plugin, Protocol):
    """The pool's endpoint add/remove notifications for the plugins listed as its extractors
    (the reference's ``endpoint-notification-source``; data layer, under plugins only). epp tells
    every plugin that follows endpoints (``ForgetsEndpoints``, the KV-event subscriptions) whether
    it is listed or not; listing it is how the reference's configs say so."""


class PrefixProducer(Plugin, Protocol):
    """Prepares the prefix match of a request on each candidate (the reference's
    PrefixCacheMatchInfo), for the scorers that name it; listed under plugins only."""

    def match(self, request: InferenceRequest, candidates: list[EndpointState], cycle: CycleState) -> PrefixMatch: ...

    def record(self, endpoint: str, cycle: CycleState) -> None:
        """The request went to ``endpoint``: its matched blocks are cached there now (once per cycle)."""


class DataProducer(Plugin, Protocol):
    """Prepares per-candidate data for the filters and scorers that read it (the reference's
    data producers, e.g. latency predictions): runs first in every cycle, on all candidates. A
    config may list it in the profile or under plugins only; either way it runs in the profile."""

    def produce(self, request: InferenceRequest, snapshot: Snapshot, candidates: list[EndpointState],
                cycle: CycleState) -> None: ...


class Decider(Plugin, Protocol):
    """P/D: whether this request's prompt is computed on a prefill pod, given the decode stage's
    ``decision`` (its cycle has the prefix match on the chosen decode pod); listed under plugins
    only, named by the ``disagg-profile-handler``. ``needs_prefix_match``: it reads the decode
    profile's prefix match (the loader then requires a prefix matcher there)."""

    needs_prefix_match: ClassVar[bool]

    def disaggregate(self, request: InferenceRequest, decision: Decision) -> bool: ...


class MetricsExtractor(Plugin, Protocol):
    """Which series carry the routing signals, per endpoint (data layer; under plugins only)."""

    def engine_mapping(self) -> EngineMapping: ...


ROLES: tuple[tuple[type[Any], str], ...] = ((Filter, "filter"), (Scorer, "scorer"), (Picker, "picker"),
                                            (ProfileHandler, "profile handler"), (DataSource, "data source"),
                                            (MetricsExtractor, "metrics extractor"),
                                            (EndpointNotifier, "notification source"),
                                            (EndpointDiscovery, "discovery"),
                                            (AttributeSource, "attribute source"),
                                            (AttributeExtractor, "attribute extractor"),
                                            (PrefixProducer, "prefix producer"), (DataProducer, "data producer"),
                                            (Decider, "decider"))


# -- hooks: the request's life after the decision ---------------------------------------------------
class ObservesPicks(Protocol):
    """The request was committed to ``endpoint`` (memory such as a prefix index learns here)."""

    def on_pick(self, endpoint: str, cycle: CycleState) -> None: ...


class ObservesPrefill(Protocol):
    """The response's first bytes arrived (or it ended first): ``endpoint`` computed the prompt."""

    def on_prefill_done(self, endpoint: str, cycle: CycleState) -> None: ...


class ReadsPendingPrefill(Protocol):
    """Reads the prompt tokens epp sent each pod that it has not seen the pod prefill yet
    (``snapshot.inflight_tokens``). They drop when a response's first bytes arrive, so while a
    profile holds such a plugin every response is watched: epp never asks the gateway to skip
    response bodies (--allow-mode-override)."""


class ObservesUsage(Protocol):
    """The response reported ``cached_tokens`` prompt tokens served from ``endpoint``'s cache.

    ``usage_wanted`` says whether this instance needs it (the director then reads each
    response's usage); ``usage_injected`` whether epp may ask a stream for usage its client did
    not request (and strip it back out)."""

    def usage_wanted(self) -> bool: ...

    def usage_injected(self) -> bool: ...

    def on_usage(self, endpoint: str, cycle: CycleState, cached_tokens: int) -> None: ...


class ObservesCompletion(Protocol):
    """The response ended (``completion``: its usage, and whether epp saw it stream). Its presence
    makes the director read each response's usage, asking streams for it if need be."""

    def on_complete(self, endpoint: str, cycle: CycleState, completion: Completion) -> None: ...


class UsesPrefixProducer(Protocol):
    """Reads a prefix producer's matches: ``producer_name`` is the one it names (None: the
    config's only one, or one made with the reference's defaults); the loader binds it, unless
    ``own_index``: it has its own (the early-2026 form), or its parameters read none (the
    concurrency detector without tokensMustFit)."""

    producer_name: str | None
    own_index: bool

    def bind_producer(self, producer: PrefixProducer | None) -> None: ...


class UsesLatencyProducer(Protocol):
    """Reads a latency producer's predictions: ``latency_producer_name`` is the one it names
    (None: the config's only one, or one the loader makes with the reference's defaults)."""

    latency_producer_name: str | None

    def bind_latency_producer(self, producer: Any) -> None: ...


class WritesResponseHeaders(Protocol):
    """Headers to set on the response of a request sent to ``endpoint`` (the one that served it)."""

    def response_headers(self, endpoint: str, cycle: CycleState) -> Sequence[tuple[str, str]]: ...


class AlsoFilters(Protocol):
    """A scorer that is a filter too (the reference's plugins that implement both): listed in a
    profile, it filters there as well, before any scorer runs."""

    def filter(self, request: InferenceRequest, snapshot: Snapshot, candidates: list[EndpointState],
               cycle: CycleState) -> list[EndpointState]: ...


class ShapesDestination(Protocol):
    """A profile handler that changes how the chosen endpoints are reached: the addresses the
    gateway is given for them, and headers to set on the request to the server (the reference's
    data-parallel handler: the pod's primary port, and the rank in ``x-data-parallel-host-port``)."""

    def destination(self, endpoints: tuple[str, ...]) -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]: ...


class PreparesRequests(Protocol):
    """Work on a request before admission that may have to wait (the burst producer's window):
    ``prepare`` returns what to call and await (None: nothing to wait for), after the token
    producer's; it may leave what it learnt in ``request.prepared[its name]``. ``close`` releases
    what it holds when the process stops or a reload replaces it."""

    def prepare(self, request: InferenceRequest, snapshot: Snapshot) -> Callable[[], Awaitable[None]] | None: ...

    async def close(self) -> None: ...


class ForgetsEndpoints(Protocol):
    """``endpoint`` left the pool: drop what is kept about it."""

    def on_endpoint_removed(self, endpoint: str) -> None: ...


# -- what a plugin needs from the process -----------------------------------------------------------
class LoadsResources(Protocol):
    """Files to read before serving (a tokenizer): ``load`` runs once, off the event loop, and
    raises ConfigError naming the parameter when it cannot."""

    def load(self) -> None: ...


class HoldsPrefixIndex(Protocol):
    """Reports its approximate prefix index's size (the pool's prefix-indexer-size gauge)."""

    def prefix_index_size(self) -> int: ...


class SharesPrefixIndex(Protocol):
    """An approximate prefix index that active-active replicas share: ``take_prefix_records``
    gives what was recorded since its last call (its block size, then (endpoint, block hashes)
    pairs; the first call starts the journal), ``add_peer_prefix_records`` records what another
    replica's same plugin recorded (ignored when the block sizes differ)."""

    def take_prefix_records(self) -> tuple[int, list[tuple[str, list[int]]]]: ...

    def add_peer_prefix_records(self, block_tokens: int, records: Iterable[tuple[str, list[int]]]) -> None: ...


class ExportsMetrics(Protocol):
    """Metric families of its own, collected at scrape time on the event loop."""

    def metric_families(self, pool: str) -> Iterable[Metric]: ...


class ReadsClock(Protocol):
    """Times what it learns from with a monotonic clock (a response's TTFT): ``use_clock`` gives
    it the one to read instead, for a replay on a virtual clock (``epp tune``)."""

    def use_clock(self, clock: Callable[[], float]) -> None: ...


class DrawsRandomly(Protocol):
    """Draws from a random source of its own (ties, exploration): ``reseed`` makes the draws
    repeat, so a replay compares configs on the same draws (``epp tune``)."""

    def reseed(self, seed: int) -> None: ...


class DrawsFromRng(DrawsRandomly):
    """``DrawsRandomly`` for a plugin whose draws all come from ``self.rng``."""

    rng: random.Random

    def reseed(self, seed: int) -> None:
        self.rng = random.Random(seed)


class SubscribesKVEvents(Protocol):
    """Wants the pods' KV-cache events: the subscription (None: not configured) and the index
    they feed. The process keeps one subscriber per endpoint."""

    def kv_subscription(self) -> tuple[KVEventsSpec, BlockIndex] | None: ...


# Hook protocol -> its methods (one signature each); checked when a plugin type is registered.
HOOKS: tuple[tuple[type[Any], tuple[str, ...]], ...] = (
    (ObservesPicks, ("on_pick",)),
    (ObservesPrefill, ("on_prefill_done",)),
    (ReadsPendingPrefill, ()),
    (ObservesUsage, ("usage_wanted", "usage_injected", "on_usage")),
    (ObservesCompletion, ("on_complete",)),
    (ForgetsEndpoints, ("on_endpoint_removed",)),
    (LoadsResources, ("load",)),
    (HoldsPrefixIndex, ("prefix_index_size",)),
    (SharesPrefixIndex, ("take_prefix_records", "add_peer_prefix_records")),
    (UsesPrefixProducer, ("bind_producer",)),
    (UsesLatencyProducer, ("bind_latency_producer",)),
    (AlsoFilters, ("filter",)),
    (WritesResponseHeaders, ("response_headers",)),
    (ShapesDestination, ("destination",)),
    (ExportsMetrics, ("metric_families",)),
    (SubscribesKVEvents, ("kv_subscription",)),
    (PreparesRequests, ("prepare", "close")),
    (ReadsClock, ("use_clock",)),
    (DrawsRandomly, ("reseed",)),
)
ROLE_METHODS: dict[type[Any], tuple[str, ...]] = {Filter: ("filter",), Scorer: ("score",), Picker: ("pick",),
                                                  ProfileHandler: (), DataSource: ("scrape_target", "scrape_interval"),
                                                  MetricsExtractor: ("engine_mapping",), EndpointNotifier: (),
                                                  EndpointDiscovery: ("endpoints_file",),
                                                  AttributeSource: ("attribute_target", "attribute_interval"),
                                                  AttributeExtractor: ("attributes",),
                                                  PrefixProducer: ("match", "record"), DataProducer: ("produce",),
                                                  Decider: ("disaggregate",)}


def declares(plugin: object, hook: type[Any]) -> bool:
    """True when ``plugin``'s class subclasses ``hook`` (declared, not guessed from names)."""
    return hook in type(plugin).__mro__
