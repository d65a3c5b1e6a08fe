"""EndpointPickerConfig: the reference's config format, read strictly.

Every error names the file and the field path (``plugins[2].parameters.blockSizeTokens``). A
config builds a Scheduler; rebuilding keeps plugin instances whose type, name and parameters did
not change, so a weight edit does not throw away the prefix index.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from epp.datalayer import DATA_LAYER
from epp.filewatch import WatchedFile
from epp.flowcontrol import config as flow_config
from epp.flowcontrol import contract as flow_contract
from epp.flowcontrol.contract import SaturationDetector
from epp.flowcontrol.controller import FlowSettings
from epp.flowcontrol.detectors import DETECTORS, ConcurrencyDetector
from epp.flowcontrol.policies import FLOW_POLICIES
from epp.requestcontrol import contract as request_contract
from epp.requestcontrol.admission import Admitter
from epp.requestcontrol.admitters import ADMITTERS
from epp.requestcontrol.parsers import DEFAULT_PARSERS, PARSERS, ParserTable
from epp.requestcontrol.tokens import Tokenizes, TokenProducer
from epp.scheduling.contract import (
    AlsoFilters,
    AttributeExtractor,
    AttributeSource,
    DataSource,
    ForgetsEndpoints,
    LoadsResources,
    MetricsExtractor,
    PreparesRequests,
    UsesLatencyProducer,
    UsesPrefixProducer,
    declares,
)
from epp.scheduling.disagg import DisaggProfileHandler
from epp.scheduling.framework import Profile, Scheduler, producer_order
from epp.scheduling.latency import PredictedLatencyProducer
from epp.scheduling.params import Params, finite, show
from epp.scheduling.plugins import BUILTIN, MaxScorePicker
from epp.scheduling.precise_producer import PrecisePrefixProducer
from epp.scheduling.prefix_producer import EARLY_2026, REFERENCE_DEFAULTS, ApproxPrefixProducer
from epp.scheduling.registry import SCHEDULING, PluginRegistry, PluginType, check_contract
from epp.scheduling.types import MATCHED_TOKENS, ConfigError

log = logging.getLogger("epp.config")

# The reference's current apiVersion first; the older two are still read (the reference logs the
# x-k8s.io one as deprecated).
API_VERSIONS = ("llm-d.ai/v1alpha1", "inference.networking.x-k8s.io/v1alpha1", "inference.networking.k8s.io/v1alpha1")
# featureGates the reference registers -> (its default, the value epp cannot honour and why; None:
# epp does either).
FEATURE_GATES: dict[str, tuple[bool, tuple[bool, str] | None]] = {
    "flowControl": (False, None),
    "haPopulateNonLeaderDatastore": (False, (False, "epp's standby replicas always discover and scrape the pool")),
}
# Sections of the reference's schema epp does not read yet: refused, never ignored.
NOT_YET = {"data": "the data layer is configured by flags in epp (--engine, --endpoints..., discovery)"}
KIND = "EndpointPickerConfig"
# The reference's plugin types epp knows and does not implement: refused by name, with the reason.
NOT_SUPPORTED_TYPES = {
    "inflight-load-producer": "epp counts in-flight requests and tokens itself",
    "models-data-source": "no epp plugin reads the models it lists; the pods' metrics name their models",
    **dict.fromkeys(("pd-profile-handler", "prefill-header-handler", "disagg-headers-handler"),
                    "deprecated in the reference: use disagg-profile-handler"),
    **dict.fromkeys(("always-disagg-multimodal-decider", "mm-embeddings-cache-producer", "mm-embeddings-cache-scorer"),
                    "multimodal encode disaggregation is not implemented"),
    **dict.fromkeys(("topology-extractor", "topology-filter", "topology-scorer"),
                    "topology-aware routing is not implemented"),
    **dict.fromkeys(("vllmhttp-parser", "vllmgrpc-parser", "sglanghttp-parser", "vertexai-parser"),
                    "epp implements the openai, anthropic and passthrough parsers"),
}
# The dataLayer fields epp does not implement, with the reason.
DATA_LAYER_NOT_SUPPORTED = {
    "peerDiscovery": "epp replicas share no state (one leader serves)",
    "crossReplicaSyncerPluginRef": "epp replicas share no state (one leader serves)",
    "crossReplicaSyncInterval": "epp replicas share no state (one leader serves)",
}

DEFAULT_CONFIG = """\
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: queue-scorer
- type: kv-cache-utilization-scorer
- type: prefix-cache-scorer
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: queue-scorer
    weight: 2
  - pluginRef: kv-cache-utilization-scorer
    weight: 2
  - pluginRef: prefix-cache-scorer
    weight: 3
  - pluginRef: max-score-picker
"""


def precise_config(tokenizer: str, kv_endpoint: str, kv_replay: str | None = None, topic: str = "",
                   **parameters: Any) -> str:
    """The default profile with ``precise-prefix-cache-scorer`` (weight 3) in place of the
    approximate prefix scorer: the config the benchmarks, tests and examples start from."""
    kv: dict[str, str] = {"endpoint": kv_endpoint}
    if kv_replay:
        kv["replayEndpoint"] = kv_replay
    if topic:
        kv["topic"] = topic
    precise = {"type": "precise-prefix-cache-scorer",
               "parameters": {"tokenizer": tokenizer, "kvEvents": kv, **parameters}}
    doc = {"apiVersion": API_VERSIONS[0], "kind": KIND,
           "plugins": [{"type": "queue-scorer"}, {"type": "kv-cache-utilization-scorer"}, precise,
                       {"type": "max-score-picker"}],
           "schedulingProfiles": [{"name": "default", "plugins": [
               {"pluginRef": "queue-scorer", "weight": 2}, {"pluginRef": "kv-cache-utilization-scorer", "weight": 2},
               {"pluginRef": "precise-prefix-cache-scorer", "weight": 3}, {"pluginRef": "max-score-picker"}]}]}
    text: str = yaml.safe_dump(doc, sort_keys=False)
    return text


@dataclass(frozen=True, slots=True)
class PluginSpec:
    """One validated ``plugins[]`` entry; ``instance`` was built from it (no I/O yet)."""

    name: str
    type: PluginType
    parameters: Mapping[str, Any]
    path: str
    instance: Any

    def key(self) -> str:
        return f"{self.type.type_name}/{self.name}/{sorted(self.parameters.items())!r}"

    def new_instance(self) -> Any:
        return self.type.cls(self.name, Params(self.parameters, self.path + ".parameters"))


@dataclass(frozen=True, slots=True)
class Runtime:
    """What the director takes from a config besides the scheduler."""

    detector: SaturationDetector  # legacy admission's (and flow control's) saturation detector
    flow: FlowSettings | None  # None: the flowControl gate is off
    admitters: tuple[Admitter, ...] = ()
    tokens: Tokenizes | None = None  # the token producer (None: requests go without token ids)
    parsers: ParserTable | None = None  # requestHandler.parsers (None: the defaults)
    preparers: tuple[PreparesRequests, ...] = ()  # plugins with work before admission (the burst window)


@dataclass(slots=True)
class PickerConfig:
    """A validated config (the plan): ``build`` turns it into a Scheduler, once per reload."""

    plugins: dict[str, PluginSpec]
    profile_name: str
    filter_refs: tuple[str, ...]
    scorer_refs: tuple[tuple[str, float], ...]
    picker_ref: str | None
    source: str
    digest: str
    data_refs: tuple[str, ...] = ()  # the data-layer plugins (metrics source, extractor), at most one of each
    detector_ref: str = flow_config.DEFAULT_DETECTOR  # admission's and flow control's saturation detector
    flow: flow_config.FlowPlan | None = None  # flow control (None: the flowControl gate is off)
    admitter_refs: tuple[str, ...] = ()  # every admitter plugin listed, in order
    early_dialect: bool = False  # an older apiVersion: a bare prefix-cache-scorer keeps the early-2026 index
    producer_refs: tuple[str, ...] = ()  # data producers listed (in the profile or under plugins only)
    handler_ref: str | None = None  # the profile handler, when one is listed
    prefill_profile: ProfilePlan | None = None  # P/D: the prefill stage (the main profile is decode)
    decider_ref: str | None = None  # P/D: the decider that says when the prefill stage runs
    token_ref: str | None = None  # the token producer, when one is listed
    parser_refs: tuple[str, ...] = ()  # requestHandler.parsers, in order (made by type name when not listed)
    discovery_ref: str | None = None  # dataLayer.discovery (file-discovery), when given
    _handed_out: bool = False

    def build(self, previous: Mapping[str, Any] | None = None) -> tuple[Scheduler, dict[str, Any]]:
        """A Scheduler, plus the plugin instances by key (pass them back on the next build, so an
        unchanged plugin keeps its state). New plugins that load files load here: call it off
        the event loop. Raises ConfigError when a plugin cannot load."""
        instances: dict[str, Any] = {}
        old = previous or {}
        fresh = self._handed_out  # a second build of one plan gets instances of its own
        self._handed_out = True

        def instance(spec: PluginSpec) -> Any:
            k = spec.key()
            if k not in instances:
                inst = old.get(k)
                if inst is None:
                    inst = spec.new_instance() if fresh else spec.instance
                    if declares(inst, LoadsResources):
                        try:
                            inst.load()
                        except ConfigError as e:
                            raise ConfigError(f"{self.source}: {e.path}", e.message) from None
                instances[k] = inst
            return instances[k]

        for ref in (*self.data_refs, self.detector_ref, *(self.flow.refs() if self.flow else ())):
            instance(self.plugins[ref])
        admitters = [instance(self.plugins[ref]) for ref in self.admitter_refs]
        if self.token_ref is not None:
            instance(self.plugins[self.token_ref])
        for ref in self.parser_refs:
            instance(self.plugins[ref])

        def stage(name: str, filter_refs: tuple[str, ...], scorer_refs: tuple[tuple[str, float], ...],
                  picker_ref: str | None) -> Profile:
            picker = instance(self.plugins[picker_ref]) if picker_ref is not None else MaxScorePicker(
                "max-score-picker", Params({}, "picker"))
            return Profile(name, [(instance(self.plugins[ref]), w) for ref, w in scorer_refs], picker,
                           [instance(self.plugins[ref]) for ref in filter_refs])

        main = stage(self.profile_name, self.filter_refs, self.scorer_refs, self.picker_ref)
        plan = self.prefill_profile
        prefill = stage(plan.name, plan.filter_refs, plan.scorer_refs, plan.picker_ref) if plan is not None else None
        users = [*main.filters, *(s for s, _ in main.scorers)]
        if prefill is not None:
            users += [p for p in (*prefill.filters, *(s for s, _ in prefill.scorers)) if all(p is not u for u in users)]
        producers = [instance(self.plugins[ref]) for ref in self.producer_refs]
        producers += self._bind_latency_producers([*admitters, *users], producers, instances, old)
        main.prefix_producers = self._bind_producers([*producers, *users], instance, instances, old)
        main.producers = producers
        handler = instance(self.plugins[self.handler_ref]) if self.handler_ref is not None else None
        prefill_stage = None
        if prefill is not None:
            prefill.producers = producers  # data producers run in every stage
            prefill_stage = Scheduler(prefill)
        decider = instance(self.plugins[self.decider_ref]) if self.decider_ref is not None else None
        return Scheduler(main, handler=handler, prefill=prefill_stage, decider=decider), instances

    def _bind_latency_producers(self, users: list[Any], listed: list[Any], instances: dict[str, Any],
                                old: Mapping[str, Any]) -> list[Any]:
        """Each plugin that reads latency predictions gets the producer it names, or the config's
        only one, or one with the reference's defaults; returns the producers made here."""
        made: list[Any] = []
        for user in users:
            if not declares(user, UsesLatencyProducer):
                continue
            named = user.latency_producer_name
            producer = next((p for p in listed if p.name == named), None) if named else (listed[0] if listed else None)
            if producer is None:
                k = f"{PredictedLatencyProducer.type_name}/(made)"
                producer = instances.get(k) or old.get(k) or PredictedLatencyProducer(
                    PredictedLatencyProducer.type_name, Params({}, "predicted-latency-producer"))
                instances[k] = producer
                listed = [producer]
                made.append(producer)
            user.bind_latency_producer(producer)
        return made

    def _bind_producers(self, users: list[Any], instance: Callable[[PluginSpec], Any], instances: dict[str, Any],
                        old: Mapping[str, Any]) -> list[Any]:
        """Each plugin that reads a prefix producer gets the one it names, the config's only one,
        or one with the reference's defaults (kept across reloads like any plugin); returns the
        producers bound (each once)."""
        users = [u for u in users if declares(u, UsesPrefixProducer) and not u.own_index]
        bound: list[Any] = []
        if not users:
            return bound
        listed = [spec for spec in self.plugins.values() if spec.type.role == "prefix producer"]
        for user in users:
            if user.producer_name is not None:
                producer = instance(self.plugins[user.producer_name])
            elif listed:
                producer = instance(listed[0])
            else:
                k = f"{ApproxPrefixProducer.type_name}/(made)/{'early-2026' if self.early_dialect else 'reference'}"
                producer = instances.get(k) or old.get(k) or ApproxPrefixProducer.with_limits(
                    ApproxPrefixProducer.type_name, EARLY_2026 if self.early_dialect else REFERENCE_DEFAULTS)
                instances[k] = producer
            if not any(producer is b for b in bound):
                bound.append(producer)
            user.bind_producer(producer)
        return bound

    def discovery(self) -> tuple[str, bool] | None:
        """dataLayer.discovery's endpoints file and whether it is watched (None: the flags say)."""
        if self.discovery_ref is None:
            return None
        found: tuple[str, bool] = self.plugins[self.discovery_ref].instance.endpoints_file()
        return found

    def runtime(self, instances: Mapping[str, Any]) -> Runtime:
        """The request-control side of the config, from ``build``'s instances."""
        def get(ref: str) -> Any:
            return instances[self.plugins[ref].key()]

        return Runtime(get(self.detector_ref), self.flow.settings(get) if self.flow is not None else None,
                       tuple(get(ref) for ref in self.admitter_refs),
                       get(self.token_ref) if self.token_ref is not None else None,
                       ParserTable([get(ref) for ref in self.parser_refs]) if self.parser_refs else None,
                       tuple(p for spec in self.plugins.values() if (p := instances.get(spec.key())) is not None
                             and declares(p, PreparesRequests)))


def _expect(value: Any, kind: type | tuple[type, ...], path: str, what: str) -> Any:
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise ConfigError(path, f"expected {what}, got {type(value).__name__}")
    return value


def _no_unknown(raw: Mapping[str, Any], allowed: set[str], path: str) -> None:
    for k in raw:
        if k not in allowed:
            prefix = f"{path}." if path else ""
            raise ConfigError(f"{prefix}{k}", f"unknown field (allowed: {', '.join(sorted(allowed))})")


MAX_WEIGHT = 1e6


# Every plugin role a config may use: scheduling, flow control, request control.
ALL_ROLES = SCHEDULING.plus(flow_contract.ROLES, flow_contract.ROLE_METHODS, flow_contract.HOOKS).plus(
    request_contract.ROLES, request_contract.ROLE_METHODS)


def installed_plugins() -> PluginRegistry:
    """epp's plugin types (scheduling, data layer, flow control, admitters) plus those installed
    packages register (``epp.plugins``)."""
    return PluginRegistry.with_installed((*BUILTIN, *DATA_LAYER, *DETECTORS, *FLOW_POLICIES, *ADMITTERS, TokenProducer,
                                          *PARSERS),
                                         known=ALL_ROLES)


def parse_config(text: str | bytes, source: str = "<config>", registry: PluginRegistry | None = None
                 ) -> PickerConfig:
    """Validate an EndpointPickerConfig document into a plan, without I/O. Raises
    ConfigError('<source>: <path>: ...') and nothing else, whatever the input (a config file is
    operator input: never a traceback)."""
    try:
        decoded = decode_text(text)
        check_shape(decoded)
        return _parse(decoded, source, registry or installed_plugins())
    except ConfigError as e:
        raise ConfigError(f"{source}: {e.path}", e.message) from None
    except RecursionError:
        raise ConfigError(f"{source}: document", "nested too deeply") from None
    except Exception as e:  # a case the checks above missed: still one line, naming the file
        log.debug("unexpected error parsing %s", source, exc_info=True)
        raise ConfigError(f"{source}: document", f"cannot be read ({type(e).__name__}: {show(str(e))})") from None


MAX_CONFIG_BYTES = 1 << 20
MAX_NESTING = 64
_BRACKETS = re.compile(r"[\[\]{}]")
_DEEP_BLOCK = re.compile(rf"^( {{256,}}|(?:- *){{{MAX_NESTING},}})", re.MULTILINE)


def check_shape(text: str) -> None:
    """Refuse, cheaply, documents that would cost the YAML parser seconds (deep nesting recurses
    once per level: 3,000 levels took 1.9 s) before they reach it."""
    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigError("document", f"larger than {MAX_CONFIG_BYTES} bytes")
    depth = 0
    for m in _BRACKETS.finditer(text):
        depth += 1 if m.group() in "[{" else -1
        if depth > MAX_NESTING:
            line = text.count("\n", 0, m.start()) + 1
            raise ConfigError(f"line {line}", f"nested deeper than {MAX_NESTING} levels")
    deep = _DEEP_BLOCK.search(text)
    if deep is not None:
        raise ConfigError(f"line {text.count(chr(10), 0, deep.start()) + 1}",
                          f"nested deeper than {MAX_NESTING} levels")


def decode_text(data: str | bytes) -> str:
    """UTF-8 text of a config file; ConfigError naming the first bad byte otherwise."""
    if isinstance(data, str):
        return data
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError("document", f"not UTF-8 text (byte {e.start}: {data[e.start:e.start + 1]!r})") from None


def _parse(text: str, source: str, registry: PluginRegistry) -> PickerConfig:
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "document"
        raise ConfigError(where, f"invalid YAML: {getattr(e, 'problem', e)}") from None
    if raw is None:
        raw = {}
    _expect(raw, dict, "(root)", "a mapping")
    _no_unknown(raw, {"apiVersion", "kind", "featureGates", "plugins", "schedulingProfiles", "saturationDetector",
                      "flowControl", "dataLayer", "requestHandler", "parser", *NOT_YET}, "")
    for section, why in NOT_YET.items():
        if section in raw:
            raise ConfigError(section, f"not supported by epp ({why})")
    api = raw.get("apiVersion", API_VERSIONS[0])
    if api not in API_VERSIONS:
        raise ConfigError("apiVersion", f"unsupported {show(api)} (expected one of {', '.join(API_VERSIONS)})")
    if raw.get("kind", KIND) != KIND:
        raise ConfigError("kind", f"expected {KIND}, got {show(raw.get('kind'))}")
    gates = raw.get("featureGates") or []
    _expect(gates, list, "featureGates", "a list")
    enabled = {name: default for name, (default, _) in FEATURE_GATES.items()}
    for i, gate in enumerate(gates):
        name, on = _feature_gate(_expect(gate, str, f"featureGates[{i}]", "a string"), f"featureGates[{i}]")
        enabled[name] = on
    plugins: dict[str, PluginSpec] = {}
    for i, p in enumerate(_expect(raw.get("plugins") or [], list, "plugins", "a list")):
        path = f"plugins[{i}]"
        _expect(p, dict, path, "a mapping")
        _no_unknown(p, {"name", "type", "parameters"}, path)
        type_name = p.get("type")
        if not isinstance(type_name, str) or not type_name:
            raise ConfigError(f"{path}.type", "required")
        if type_name in NOT_SUPPORTED_TYPES and type_name not in registry.names():
            raise ConfigError(f"{path}.type",
                              f"{type_name!r} is not supported by epp ({NOT_SUPPORTED_TYPES[type_name]})")
        ptype = registry.get(type_name, f"{path}.type")
        name = p.get("name") or type_name
        _expect(name, str, f"{path}.name", "a string")
        if name in plugins:
            raise ConfigError(f"{path}.name", f"duplicate plugin name {show(name)}")
        params = p.get("parameters") or {}
        _expect(params, dict, f"{path}.parameters", "a mapping")
        # Built now (reading parameters only) so errors point at the file, not at the first request.
        instance = ptype.cls(name, Params(params, f"{path}.parameters"))
        plugins[name] = PluginSpec(name, ptype, params, path, instance)
    profiles = _expect(raw.get("schedulingProfiles") or [], list, "schedulingProfiles", "a list")
    if not profiles:
        raise ConfigError("schedulingProfiles", "at least one profile is required")
    plans = [_parse_profile(prof, j, plugins) for j, prof in enumerate(profiles)]
    main, prefill, decider_ref = _profiles_for_handler(plans, plugins)
    detector, flow = _flow_control(raw, plugins, registry, enabled["flowControl"])
    data_refs = _data_layer(raw.get("dataLayer"), plugins)
    discovery_ref = _discovery(raw.get("dataLayer"), plugins)
    listed = [spec.name for spec in plugins.values() if spec.type.role == "discovery"]
    if listed and discovery_ref is None:
        raise ConfigError(plugins[listed[0]].path, f"{listed[0]!r} is not named by dataLayer.discovery")
    admitter_refs = tuple(spec.name for spec in plugins.values() if spec.type.role == "admitter")
    _check_producer_refs(plugins)
    producer_refs = _check_latency_refs(plugins)
    handlers = [spec for spec in plugins.values() if spec.type.role == "profile handler"]
    if len(handlers) > 1:
        raise ConfigError(handlers[1].path, f"a config has one profile handler; {handlers[0].name!r} is one")
    parser_refs = _request_handler(raw, plugins, registry)
    tokens = [spec for spec in plugins.values() if spec.type.role == "token producer"]
    if len(tokens) > 1:
        raise ConfigError(tokens[1].path, f"a config has one token producer; {tokens[0].name!r} is one")
    _check_token_readers(plugins, tokens[0] if tokens else None)
    return PickerConfig(plugins, main.name, main.filter_refs, main.scorer_refs, main.picker_ref, source,
                        hashlib.sha256(text.encode()).hexdigest(), tuple(data_refs.values()), detector, flow,
                        admitter_refs, api != API_VERSIONS[0], producer_refs,
                        handlers[0].name if handlers else None, prefill, decider_ref,
                        tokens[0].name if tokens else None, parser_refs, discovery_ref)


def _data_layer(section: Any, plugins: Mapping[str, PluginSpec]) -> dict[str, str]:
    """The metrics source and extractor (role -> plugin name): the ones ``dataLayer.sources``
    names, else the ones listed under plugins (at most one of each; none: the flags' defaults)."""
    data_refs: dict[str, str] = {}
    listed = [spec for spec in plugins.values()
              if spec.type.role in ("data source", "metrics extractor", "attribute source", "attribute extractor")]
    inject = _data_layer_fields(section) if section is not None else True
    if section is None or (not section.get("sources") and inject):
        for spec in listed:
            if spec.type.role in data_refs:
                raise ConfigError(spec.path, f"a second {spec.type.role} ({data_refs[spec.type.role]!r} is one)")
            data_refs[spec.type.role] = spec.name
        return data_refs

    def ref(value: Any, path: str, role: str) -> str:
        _expect(value, dict, path, "a mapping")
        name = value.get("pluginRef")
        _expect(name, str, f"{path}.pluginRef", "a plugin name")
        if name not in plugins:
            raise ConfigError(f"{path}.pluginRef", f"no plugin named {show(name)} in plugins")
        if plugins[name].type.role != role:
            raise ConfigError(f"{path}.pluginRef", f"{show(name)} is a {plugins[name].type.role}, not a {role}")
        return str(name)

    for i, source in enumerate(_expect(section.get("sources") or [], list, "dataLayer.sources", "a list")):
        path = f"dataLayer.sources[{i}]"
        _no_unknown(_expect(source, dict, path, "a mapping"), {"pluginRef", "extractors"}, path)
        named = plugins.get(source.get("pluginRef")) if isinstance(source.get("pluginRef"), str) else None
        if named is not None and named.type.role == "notification source":
            _endpoint_extractors(source, path, plugins)
            continue
        kind, extracts = (("attribute source", "attribute extractor") if named is not None
                          and named.type.role == "attribute source" else ("data source", "metrics extractor"))
        if kind in data_refs:
            raise ConfigError(path, f"a second {kind} ({data_refs[kind]!r} is one)")
        data_refs[kind] = ref(source, path, kind)
        extractors = _expect(source.get("extractors") or [], list, f"{path}.extractors", "a list")
        for j, extractor in enumerate(extractors):
            epath = f"{path}.extractors[{j}]"
            _no_unknown(_expect(extractor, dict, epath, "a mapping"), {"pluginRef"}, epath)
            if extracts in data_refs:
                raise ConfigError(epath, f"a second {extracts} ({data_refs[extracts]!r} is one)")
            data_refs[extracts] = ref(extractor, epath, extracts)
    if "data source" not in data_refs and not inject:
        raise ConfigError("dataLayer.injectDefaults", "false with no metrics source is not supported by epp (its "
                                                      "scorers and detectors read the pods' metrics)")
    for spec in listed:
        if spec.name not in data_refs.values():
            raise ConfigError(spec.path, f"{spec.type.role} {spec.name!r} is not named in dataLayer.sources")
    return data_refs


def _request_handler(raw: Mapping[str, Any], plugins: dict[str, PluginSpec], registry: PluginRegistry
                     ) -> tuple[str, ...]:
    """``requestHandler.parsers`` (or the deprecated top-level ``parser``; the new field wins), else
    the reference's defaults: each ref is a listed parser, or a parser type made with its defaults."""
    handler = raw.get("requestHandler")
    refs: list[tuple[Any, str]] = []
    if handler is not None:
        _expect(handler, dict, "requestHandler", "a mapping")
        _no_unknown(handler, {"parsers"}, "requestHandler")
        for i, p in enumerate(_expect(handler.get("parsers") or [], list, "requestHandler.parsers", "a list")):
            path = f"requestHandler.parsers[{i}]"
            _no_unknown(_expect(p, dict, path, "a mapping"), {"pluginRef"}, path)
            refs.append((p.get("pluginRef"), f"{path}.pluginRef"))
    if not refs and raw.get("parser") is not None:
        old = _expect(raw["parser"], dict, "parser", "a mapping")
        _no_unknown(old, {"pluginRef"}, "parser")
        refs.append((old.get("pluginRef"), "parser.pluginRef"))
    if not refs:  # the defaults (those a custom registry has)
        refs = [(name, "requestHandler.parsers") for name in DEFAULT_PARSERS if name in registry.names()]
    out = []
    for name, path in refs:
        _expect(name, str, path, "a plugin name")
        if name not in plugins:
            if name in NOT_SUPPORTED_TYPES:
                raise ConfigError(path, f"{name!r} is not supported by epp ({NOT_SUPPORTED_TYPES[name]})")
            if name not in registry.names() or registry.get(name, path).role != "parser":
                raise ConfigError(path, f"no plugin named {show(name)} in plugins (nor a parser type)")
            ptype = registry.get(name, path)
            plugins[name] = PluginSpec(name, ptype, {}, path, ptype.cls(name, Params({}, path)))
        elif plugins[name].type.role != "parser":
            raise ConfigError(path, f"{show(name)} is a {plugins[name].type.role}, not a parser")
        out.append(name)
    return tuple(out)


def _endpoint_extractors(source: Mapping[str, Any], path: str, plugins: Mapping[str, PluginSpec]) -> None:
    """The extractors of an endpoint-notification-source: plugins that follow the pool's endpoints."""
    for j, extractor in enumerate(_expect(source.get("extractors") or [], list, f"{path}.extractors", "a list")):
        epath = f"{path}.extractors[{j}]"
        _no_unknown(_expect(extractor, dict, epath, "a mapping"), {"pluginRef"}, epath)
        name = extractor.get("pluginRef")
        _expect(name, str, f"{epath}.pluginRef", "a plugin name")
        if name not in plugins:
            raise ConfigError(f"{epath}.pluginRef", f"no plugin named {show(name)} in plugins")
        if not declares(plugins[name].instance, ForgetsEndpoints):
            raise ConfigError(f"{epath}.pluginRef", f"{show(name)} does not follow endpoint notifications")


def _discovery(section: Any, plugins: Mapping[str, PluginSpec]) -> str | None:
    """``dataLayer.discovery``: the file-discovery plugin it names (None: the flags say)."""
    if not isinstance(section, dict) or section.get("discovery") is None:
        return None
    d = _expect(section["discovery"], dict, "dataLayer.discovery", "a mapping")
    _no_unknown(d, {"pluginRef"}, "dataLayer.discovery")
    name = d.get("pluginRef")
    _expect(name, str, "dataLayer.discovery.pluginRef", "a plugin name")
    if name not in plugins:
        raise ConfigError("dataLayer.discovery.pluginRef", f"no plugin named {show(name)} in plugins")
    if plugins[name].type.role != "discovery":
        raise ConfigError("dataLayer.discovery.pluginRef", f"{show(name)} is a {plugins[name].type.role}, "
                                                           "not a discovery plugin (file-discovery)")
    return str(name)


def _data_layer_fields(section: Any) -> bool:
    """The section's own fields; returns injectDefaults."""
    _expect(section, dict, "dataLayer", "a mapping")
    _no_unknown(section, {"injectDefaults", "sources", "discovery", *DATA_LAYER_NOT_SUPPORTED}, "dataLayer")
    for key, why in DATA_LAYER_NOT_SUPPORTED.items():
        if section.get(key) is not None:
            raise ConfigError(f"dataLayer.{key}", f"not supported by epp ({why})")
    inject = section.get("injectDefaults", True)
    _expect(inject, bool, "dataLayer.injectDefaults", "true or false")
    return bool(inject)


def _check_token_readers(plugins: Mapping[str, PluginSpec], tokens: PluginSpec | None) -> None:
    """A precise prefix producer without real token ids routes on its approximate index: say so
    at load (the reference's auto-made estimate producer would silently never match)."""
    readers = [spec.name for spec in plugins.values() if spec.type.cls is PrecisePrefixProducer]
    if not readers:
        return
    if tokens is None:
        log.warning("%s: no token-producer is listed: matched on the approximate index (list a token-producer "
                    "with vllm.url or tokenizer for the precise one)", ", ".join(readers))
    elif not tokens.instance.real:
        log.warning("%s: the token-producer %r estimates tokens from bytes, which never match the pods' blocks: "
                    "matched on the approximate index", ", ".join(readers), tokens.name)


def _check_producer_refs(plugins: Mapping[str, PluginSpec]) -> None:
    """A prefix producer a plugin names exists and is one; unnamed, there is at most one."""
    producers = [spec.name for spec in plugins.values() if spec.type.role == "prefix producer"]
    _check_named(plugins, UsesPrefixProducer, lambda p: p.producer_name, "prefixMatchInfoProducerName", producers,
                 lambda spec: f"a {spec.type.role}, not a prefix producer", "prefix producers",
                 lambda p: bool(p.own_index))


def _check_named(plugins: Mapping[str, PluginSpec], hook: type[Any], named_by: Callable[[Any], str | None],
                 param: str, targets: list[str], wrong: Callable[[PluginSpec], str], kinds: str,
                 needs_none: Callable[[Any], bool] = lambda _: False) -> None:
    """Each plugin declaring ``hook`` names (``param``) one of ``targets``, or names none while
    there is at most one (unless ``needs_none``: it has its own)."""
    for spec in plugins.values():
        if not declares(spec.instance, hook):
            continue
        named = named_by(spec.instance)
        path = f"{spec.path}.parameters.{param}"
        if named is not None:
            if named not in plugins:
                raise ConfigError(path, f"no plugin named {show(named)} in plugins")
            if named not in targets:
                raise ConfigError(path, f"{show(named)} is {wrong(plugins[named])}")
        elif len(targets) > 1 and not needs_none(spec.instance):
            raise ConfigError(path, f"required: the config has {len(targets)} {kinds} ({', '.join(targets)})")


@dataclass(frozen=True, slots=True)
class ProfilePlan:
    """One validated ``schedulingProfiles[]`` entry."""

    name: str
    filter_refs: tuple[str, ...]
    scorer_refs: tuple[tuple[str, float], ...]
    picker_ref: str | None
    path: str


def _parse_profile(prof: Any, j: int, plugins: Mapping[str, PluginSpec]) -> ProfilePlan:
    at = f"schedulingProfiles[{j}]"
    _expect(prof, dict, at, "a mapping")
    _no_unknown(prof, {"name", "plugins"}, at)
    pname = prof.get("name") or "default"
    _expect(pname, str, f"{at}.name", "a string")
    filter_refs: list[str] = []
    scorer_refs: list[tuple[str, float]] = []
    picker_ref: str | None = None
    for k, ref in enumerate(_expect(prof.get("plugins") or [], list, f"{at}.plugins", "a list")):
        path = f"{at}.plugins[{k}]"
        _expect(ref, dict, path, "a mapping")
        _no_unknown(ref, {"pluginRef", "weight"}, path)
        name = ref.get("pluginRef")
        _expect(name, str, f"{path}.pluginRef", "a plugin name")
        if name not in plugins:
            raise ConfigError(f"{path}.pluginRef", f"no plugin named {show(name)} in plugins")
        role = plugins[name].type.role
        if role == "saturation detector":  # a detector is a filter too (the endpoints under its limits)
            role = "filter"
        if role != "scorer" and "weight" in ref:
            raise ConfigError(f"{path}.weight", f"only scorers take a weight ({show(name)} is a {role})")
        if role == "scorer":
            weight = ref.get("weight", 1)
            if (isinstance(weight, bool) or not isinstance(weight, int | float) or not finite(weight)
                    or not 0 <= weight <= MAX_WEIGHT):
                raise ConfigError(f"{path}.weight", f"expected a number >= 0 and <= {MAX_WEIGHT:g}, got {show(weight)}")
            scorer_refs.append((name, float(weight)))
            if declares(plugins[name].instance, AlsoFilters):
                filter_refs.append(name)
        elif role == "picker":
            if picker_ref is not None:
                raise ConfigError(f"{path}.pluginRef", f"a profile has one picker; {picker_ref!r} is already set")
            picker_ref = name
        elif role == "filter":
            filter_refs.append(name)
        elif role == "data producer":
            pass  # data producers run in the profile wherever they are listed
        else:
            raise ConfigError(f"{path}.pluginRef", f"{show(name)} is a {role}: list it under plugins only")
    producer_order([(plugins[ref].instance, w) for ref, w in scorer_refs])  # a slot cycle is a config error
    return ProfilePlan(pname, tuple(filter_refs), tuple(scorer_refs), picker_ref, at)


def _profiles_for_handler(plans: list[ProfilePlan], plugins: Mapping[str, PluginSpec]
                          ) -> tuple[ProfilePlan, ProfilePlan | None, str | None]:
    """(the profile that picks the endpoint, P/D's prefill profile, its decider): one profile,
    or with a disagg-profile-handler the decode and prefill ones it names."""
    names = [p.name for p in plans]
    for j, n in enumerate(names):
        if n in names[:j]:
            raise ConfigError(f"schedulingProfiles[{j}].name", f"duplicate profile name {show(n)}")
    handler = next((spec for spec in plugins.values() if isinstance(spec.instance, DisaggProfileHandler)), None)
    if handler is None:
        if len(plans) > 1:
            raise ConfigError(plans[1].path, "several profiles need a disagg-profile-handler (which runs its decode "
                                             "and prefill profiles); otherwise epp runs one profile")
        return plans[0], None, None
    h: DisaggProfileHandler = handler.instance
    by_name = {p.name: p for p in plans}
    for role, wanted in zip(("decode", "prefill"), h.profile_names(), strict=False):
        if wanted not in by_name:
            raise ConfigError(f"{handler.path}.parameters", f"the {role} profile {show(wanted)} is not among "
                                                            f"schedulingProfiles ({', '.join(names)})")
    for p in plans:
        if p.name not in h.profile_names():
            raise ConfigError(p.path, f"profile {show(p.name)} is not run by {handler.name} (it runs "
                                      f"{', '.join(h.profile_names())})")
    decider = None
    if h.decider_name is not None:
        spec = plugins.get(h.decider_name)
        path = f"{handler.path}.parameters.deciders.prefill"
        if spec is None:
            raise ConfigError(path, f"no plugin named {show(h.decider_name)} in plugins")
        if spec.type.role != "decider":
            raise ConfigError(path, f"{show(h.decider_name)} is a {spec.type.role}, not a decider")
        decode = by_name[h.decode_profile]
        if spec.instance.needs_prefix_match and not any(
                MATCHED_TOKENS in plugins[ref].instance.produces for ref, _ in decode.scorer_refs):
            raise ConfigError(decode.path, f"{h.decider_name} reads the decode pod's prefix match: add a prefix "
                                           "scorer to this profile")
        decider = spec.name
    return by_name[h.decode_profile], by_name[h.prefill_profile] if decider else None, decider


def _check_latency_refs(plugins: Mapping[str, PluginSpec]) -> tuple[str, ...]:
    """The data producers listed; a latency producer a plugin names exists and is one, and an
    unnamed one is unambiguous."""
    producers = tuple(spec.name for spec in plugins.values() if spec.type.role == "data producer")
    latency = [n for n in producers if plugins[n].type.type_name == PredictedLatencyProducer.type_name]
    _check_named(plugins, UsesLatencyProducer, lambda p: p.latency_producer_name, "latencyPredictionInfoProducerName",
                 latency, lambda spec: f"a {spec.type.type_name}, not a {PredictedLatencyProducer.type_name}",
                 "latency producers")
    return producers


def _flow_control(raw: Mapping[str, Any], plugins: dict[str, PluginSpec], registry: PluginRegistry,
                  gate_on: bool) -> tuple[str, flow_config.FlowPlan | None]:
    """The saturation detector (``flowControl.saturationDetector``, else the deprecated top-level
    one, whose early-2026 threshold form still reads as a utilization-detector's parameters) and,
    with the flowControl gate on, the section's plan. Default plugins a reference names and no
    entry defines are added to ``plugins``, as the reference's loader registers them."""
    def role_of(name: str) -> str | None:
        spec = plugins.get(name)
        return spec.type.role if spec is not None else None

    section = raw.get("flowControl")
    if section is not None:
        _expect(section, dict, "flowControl", "a mapping")
    top = raw.get("saturationDetector")
    if top is not None:
        _expect(top, dict, "saturationDetector", "a mapping")
        log.info("DEPRECATION: top-level saturationDetector is deprecated, use flowControl.saturationDetector")
    if top and "pluginRef" not in top:  # the early-2026 form: the thresholds themselves
        if flow_config.DEFAULT_DETECTOR in plugins:
            raise ConfigError("saturationDetector", f"give the thresholds in the {flow_config.DEFAULT_DETECTOR!r} "
                                                    "plugin entry, or here, not both")
        _add_default(plugins, registry, flow_config.DEFAULT_DETECTOR, "saturationDetector", top)
        top = None
    if section is not None and section.get("saturationDetector") is not None:
        detector = flow_config.detector_ref(section["saturationDetector"], "flowControl.saturationDetector", role_of)
    else:
        detector = flow_config.detector_ref(top, "saturationDetector", role_of)
    plan = None
    if section is not None:
        rest = {k: v for k, v in section.items() if k != "saturationDetector"}
        plan = flow_config.parse_flow_control(rest, role_of, detector)  # strict even when it will be ignored
        if not gate_on and rest:
            log.warning("flowControl is set but the flowControl feature gate is off: everything in it except "
                        "saturationDetector is ignored (add featureGates: [flowControl] to enable flow control)")
    if gate_on and plan is None:
        plan = flow_config.parse_flow_control({}, role_of, detector)
    if plan is not None:
        plan = replace(plan, eviction_refs=_eviction_refs(plugins, plan.eviction and gate_on))
    for ref in (detector, *(plan.refs() if plan is not None else ())):
        if ref not in plugins:
            _add_default(plugins, registry, ref, "flowControl", {})
    for spec in plugins.values():
        if isinstance(spec.instance, ConcurrencyDetector) and spec.instance.capped and spec.name != detector:
            raise ConfigError(f"{spec.path}.parameters.capPerEndpoint",
                              f"changes only the saturation the detector reports, and {spec.name!r} is not the "
                              f"saturation detector ({detector!r} is): name it in flowControl.saturationDetector")
    return detector, plan if gate_on else None


def _eviction_refs(plugins: Mapping[str, PluginSpec], evicting: bool) -> tuple[str, str]:
    """The eviction filter and ordering policies: the entry of each role, else the default type."""
    out = []
    for role, default in flow_config.EVICTION_ROLES:
        named = [spec for spec in plugins.values() if spec.type.role == role]
        if len(named) > 1:
            raise ConfigError(f"{named[1].path}.type", f"a second {role} ({named[0].name!r} is one): in-flight "
                                                       "eviction uses one")
        if named and not evicting:
            log.warning("%s: an %s is used only with flowControl.enableEviction: true (and the flowControl "
                        "feature gate)", named[0].path, role)
        out.append(named[0].name if named else default)
    return out[0], out[1]


_DEFAULT_TYPES = {cls.type_name: cls for cls in (*DETECTORS, *FLOW_POLICIES)}


def _add_default(plugins: dict[str, PluginSpec], registry: PluginRegistry, type_name: str, path: str,
                 params: Mapping[str, Any]) -> None:
    builtin = _DEFAULT_TYPES.get(type_name)  # epp's own, whatever registry parses the rest
    ptype = check_contract(builtin, known=ALL_ROLES) if builtin is not None else registry.get(type_name, path)
    plugins[type_name] = PluginSpec(type_name, ptype, dict(params), path,
                                    ptype.cls(type_name, Params(params, path)))


def _feature_gate(text: str, path: str) -> tuple[str, bool]:
    """``name`` or ``name=true|false`` (the reference's form); refused when epp cannot do what it asks."""
    name, sep, value = text.partition("=")
    if name not in FEATURE_GATES:
        raise ConfigError(path, f"feature gate {show(name)} is unknown (known: {', '.join(FEATURE_GATES)})")
    on = True
    if sep:
        v = value.strip().lower()
        if v not in ("true", "false", "1", "0", "t", "f"):
            raise ConfigError(path, f"{show(value)} is not a valid value for the feature gate {name}")
        on = v in ("true", "1", "t")
    cannot = FEATURE_GATES[name][1]
    if cannot is not None and on == cannot[0]:
        raise ConfigError(path, f"{name}={'true' if on else 'false'} is not supported by epp ({cannot[1]})")
    return name, on


def load_config(path: str | None) -> PickerConfig:
    if path is None:
        return parse_config(DEFAULT_CONFIG, "<default config>")
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(path, f"cannot read: {e.strerror}") from None
    return parse_config(data, path)


@dataclass(frozen=True, slots=True)
class Built:
    """A config and the scheduler built from it, with its plugin instances (for the next build)."""

    config: PickerConfig
    scheduler: Scheduler
    instances: dict[str, Any]

    def data_layer(self) -> tuple[DataSource | None, MetricsExtractor | None]:
        """The config's metrics data source and extractor (None: the flags' defaults)."""
        found = [self.instances[self.config.plugins[ref].key()] for ref in self.config.data_refs]
        source = next((p for p in found if declares(p, DataSource)), None)
        extractor = next((p for p in found if declares(p, MetricsExtractor)), None)
        return source, extractor

    def attribute_layer(self) -> tuple[AttributeSource, AttributeExtractor] | None:
        """The config's attribute source and its extractor (DCGM), when both are configured."""
        found = [self.instances[self.config.plugins[ref].key()] for ref in self.config.data_refs]
        source = next((p for p in found if declares(p, AttributeSource)), None)
        extractor = next((p for p in found if declares(p, AttributeExtractor)), None)
        return (source, extractor) if source is not None and extractor is not None else None

    def runtime(self) -> Runtime:
        """The saturation detector, the flow-control settings and the admitters."""
        return self.config.runtime(self.instances)


def build(cfg: PickerConfig, previous: Built | None = None) -> Built:
    """``cfg.build`` keeping the unchanged plugins of ``previous``."""
    scheduler, instances = cfg.build(previous.instances if previous is not None else None)
    return Built(cfg, scheduler, instances)


def config_watcher(path: str, current: Built, apply: Callable[[Built], None],
                   interval: float = 0.5) -> WatchedFile[Built]:
    """Watches the config file. A valid change is parsed and built in a thread (a new tokenizer
    loads there), then applied on the loop; an invalid one, or one whose plugins cannot load, is
    logged and ignored."""
    try:
        text: str | None = Path(path).read_bytes().decode("utf-8", "replace")
    except OSError:
        text = None

    def parse_and_build(t: str) -> Built:
        return build(parse_config(t, path), watcher.current)

    watcher = WatchedFile(path, parse_and_build, apply, what="config", current=current, current_text=text,
                          interval=interval, offload=True)
    return watcher


SHADOW_SECTIONS = {"apiVersion", "kind", "plugins", "schedulingProfiles"}


def load_shadow_config(path: str) -> tuple[str, Scheduler]:
    """A candidate config file: its name (the file's stem) and its scheduler; ConfigError naming
    the file for a section that is not scheduling."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError(path, f"cannot read the shadow config: {e.strerror}") from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(path, f"invalid YAML: {e}") from None
    if isinstance(doc, dict):
        extra = sorted(set(doc) - SHADOW_SECTIONS)
        if extra:
            raise ConfigError(f"{path}: {extra[0]}", "a shadow config holds scheduling only (plugins, "
                              "schedulingProfiles); flow control, data layer and request handling stay the live "
                              "config's")
    return Path(path).stem, build(parse_config(text, path)).scheduler
