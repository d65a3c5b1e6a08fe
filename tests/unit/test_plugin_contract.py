"""The plugin contract: declared roles and hooks, typed cycle slots, the registry, installed plugins."""

from __future__ import annotations

import threading
from importlib import metadata
from pathlib import Path
from typing import Any, ClassVar

import pytest

from epp.config import DEFAULT_CONFIG, build, config_watcher, parse_config
from epp.datalayer import DATA_LAYER
from epp.datastore.endpoint import EndpointState, EngineSignals
from epp.datastore.store import Snapshot
from epp.request import InferenceRequest
from epp.scheduling.contract import Filter, LoadsResources, ObservesPicks, ObservesPrefill, Scorer
from epp.scheduling.params import Params
from epp.scheduling.plugins import BUILTIN
from epp.scheduling.registry import ContractError, PluginRegistry, check_contract
from epp.scheduling.types import ConfigError, CycleState, SchedulingError, Slot

NOW = 10.0
SEEN: Slot[list[str]] = Slot("seen")


def snap(*addrs: str) -> Snapshot:
    return Snapshot(tuple(EndpointState(a, EngineSignals(), scraped_at=NOW) for a in addrs), {}, {}, NOW, 2.0)


def req() -> InferenceRequest:
    return InferenceRequest("r", "/v1/completions", model="m", prompt="hello")


class Producer(Scorer):
    type_name: ClassVar[str] = "test-producer"
    produces: ClassVar[tuple[Slot[Any], ...]] = (SEEN,)

    def __init__(self, name: str, params: Params) -> None:
        self.name = name
        params.done()

    def score(self, request: InferenceRequest, snapshot: Snapshot, candidates: list[EndpointState],
              cycle: CycleState) -> list[float]:
        cycle.put(SEEN, [c.address for c in candidates])
        return [0.0] * len(candidates)


class Consumer(Scorer, ObservesPicks):
    """Scores the candidates the producer saw; remembers its picks."""

    type_name: ClassVar[str] = "test-consumer"
    consumes: ClassVar[tuple[Slot[Any], ...]] = (SEEN,)

    def __init__(self, name: str, params: Params) -> None:
        self.name = name
        params.done()
        self.picked: list[str] = []

    def score(self, request: InferenceRequest, snapshot: Snapshot, candidates: list[EndpointState],
              cycle: CycleState) -> list[float]:
        seen = cycle.get(SEEN)
        assert seen is not None, "ran before its producer"
        return [1.0 if c.address == seen[-1] else 0.0 for c in candidates]

    def on_pick(self, endpoint: str, cycle: CycleState) -> None:
        self.picked.append(endpoint)


class OnlyB(Filter):
    type_name: ClassVar[str] = "test-only-b"

    def __init__(self, name: str, params: Params) -> None:
        self.name = name
        self.keep = params.text("keep", "b") or "b"
        params.done()

    def filter(self, request: InferenceRequest, snapshot: Snapshot, candidates: list[EndpointState],
               cycle: CycleState) -> list[EndpointState]:
        return [c for c in candidates if c.address == self.keep]


class Loads(Scorer, LoadsResources):
    """Counts its builds and loads, and which thread loaded it."""

    type_name: ClassVar[str] = "test-loads"
    built = 0
    loads: ClassVar[list[str]] = []

    def __init__(self, name: str, params: Params) -> None:
        self.name = name
        self.file = params.text("file", "") or ""
        params.done()
        Loads.built += 1

    def load(self) -> None:
        Loads.loads.append(threading.current_thread().name)
        if not Path(self.file).exists():
            raise ConfigError("plugins[0].parameters.file", f"no such file {self.file}")

    def score(self, request: InferenceRequest, snapshot: Snapshot, candidates: list[EndpointState],
              cycle: CycleState) -> list[float]:
        return [0.0] * len(candidates)


def registry(*extra: type[Any]) -> PluginRegistry:
    return PluginRegistry([*BUILTIN, *extra])


def config(plugins: str, refs: str) -> str:
    return f"""apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
{plugins}
schedulingProfiles:
- name: default
  plugins:
{refs}
"""


def test_consumers_run_after_producers_and_hooks_resolve_once() -> None:
    text = config("- type: test-consumer\n- type: test-producer\n- type: max-score-picker",
                  "  - {pluginRef: test-consumer, weight: 1}\n  - {pluginRef: test-producer, weight: 1}")
    s, _ = parse_config(text, registry=registry(Producer, Consumer)).build()
    assert [p.name for p, _ in s.profile.scorers] == ["test-producer", "test-consumer"]
    d = s.schedule(req(), snap("a", "b", "c"))
    assert d.primary == "c"
    s.committed(d)
    consumer = s.profile.scorers[1][0]
    assert isinstance(consumer, Consumer) and consumer.picked == ["c"]


def test_filters_narrow_the_candidates_and_refuse_when_none_is_left() -> None:
    text = config("- type: test-only-b\n- type: queue-scorer",
                  "  - {pluginRef: test-only-b}\n  - {pluginRef: queue-scorer, weight: 1}")
    s, _ = parse_config(text, registry=registry(OnlyB)).build()
    for _ in range(5):
        assert s.schedule(req(), snap("a", "b", "c")).primary == "b"
    with pytest.raises(SchedulingError, match="test-only-b") as e:
        s.schedule(req(), snap("a", "c"))
    assert e.value.status == 503
    with pytest.raises(ConfigError, match=r"plugins\[0\]\.weight: only scorers take a weight"):
        parse_config(config("- type: test-only-b", "  - {pluginRef: test-only-b, weight: 2}"),
                     registry=registry(OnlyB))


def test_a_profile_handler_in_a_profile_is_an_error() -> None:
    with pytest.raises(ConfigError, match="profile handler"):
        parse_config(config("- type: single-profile-handler\n- type: queue-scorer",
                            "  - {pluginRef: single-profile-handler}\n  - {pluginRef: queue-scorer}"))


def test_slot_cycles_are_config_errors() -> None:
    a_slot: Slot[int] = Slot("a")
    b_slot: Slot[int] = Slot("b")

    class A(Producer):
        type_name: ClassVar[str] = "test-a"
        produces: ClassVar[tuple[Slot[Any], ...]] = (a_slot,)
        consumes: ClassVar[tuple[Slot[Any], ...]] = (b_slot,)

    class B(Producer):
        type_name: ClassVar[str] = "test-b"
        produces: ClassVar[tuple[Slot[Any], ...]] = (b_slot,)
        consumes: ClassVar[tuple[Slot[Any], ...]] = (a_slot,)

    with pytest.raises(ConfigError, match="in a cycle"):
        parse_config(config("- type: test-a\n- type: test-b", "  - {pluginRef: test-a}\n  - {pluginRef: test-b}"),
                     registry=registry(A, B))


def test_cycle_slots_are_typed_and_private_to_their_owner() -> None:
    cycle = CycleState()
    mine: Slot[int] = Slot("x")
    other: Slot[int] = Slot("x")  # the same name is not the same slot
    cycle.put(mine, 3)
    assert cycle.get(mine) == 3 and cycle.get(other) is None
    assert cycle.pop(mine) == 3 and cycle.get(mine) is None


# -- the contract is checked at registration ----------------------------------------------------------
def _plugin(base: tuple[type[Any], ...], **members: Any) -> type[Any]:
    def init(self: Any, name: str, params: Params) -> None:
        self.name = name

    def score(self: Any, request: Any, snapshot: Any, candidates: Any, cycle: Any) -> list[float]:
        return []

    return type("P", base, {"type_name": "p", "__init__": init, "score": score, **members})


@pytest.mark.parametrize(("bases", "members", "message"), [
    ((Scorer, ObservesPicks), {"on_pik": lambda self, e, c: None}, "does not implement on_pick"),
    ((Scorer,), {"on_pick": lambda self, e, c: None}, r"defines on_pick\(\) without declaring ObservesPicks"),
    ((Scorer, ObservesPrefill), {"on_prefill_done": lambda self, c: None}, "takes 2 positional parameters"),
    ((Scorer, Filter), {"filter": lambda self, r, s, c, y: c}, "exactly one of"),
    ((object,), {}, "exactly one of"),
])
def test_contract_violations_are_named(bases: tuple[type[Any], ...], members: dict[str, Any], message: str) -> None:
    with pytest.raises(ContractError, match=message):
        check_contract(_plugin(bases, **members))


def test_every_builtin_follows_the_contract() -> None:
    roles = {check_contract(cls).role for cls in (*BUILTIN, *DATA_LAYER)}
    assert roles == {"filter", "scorer", "picker", "profile handler", "data source", "metrics extractor",
                     "notification source", "attribute source", "attribute extractor", "discovery", "prefix producer",
                     "data producer", "decider"}


# -- plugins built once, loaded off the loop ------------------------------------------------------
def test_a_reload_builds_each_plugin_once_and_loads_new_ones_in_a_thread(tmp_path: Path) -> None:
    import asyncio

    data = tmp_path / "data.bin"
    data.write_text("x")
    text = config(f"- type: test-loads\n  parameters: {{file: {data}}}\n- type: queue-scorer",
                  "  - {pluginRef: test-loads, weight: 1}\n  - {pluginRef: queue-scorer, weight: 1}")
    reg = registry(Loads)
    Loads.built, Loads.loads[:] = 0, []
    cfg = parse_config(text, registry=reg)
    assert (Loads.built, Loads.loads) == (1, [])  # validated: built, nothing read
    first = build(cfg)
    assert (Loads.built, len(Loads.loads)) == (1, 1)
    f = tmp_path / "epp.yaml"
    f.write_text(text)
    applied: list[Any] = []
    watcher = config_watcher(str(f), first, applied.append)
    watcher.parse = lambda t: build(parse_config(t, str(f), registry=reg), watcher.current)
    f.write_text(text.replace("weight: 1}\n  - {pluginRef: queue", "weight: 2}\n  - {pluginRef: queue"))
    assert asyncio.run(watcher.check_async())
    assert Loads.built == 2 and len(Loads.loads) == 1  # same parameters: the loaded instance is kept
    other = tmp_path / "other.bin"
    other.write_text("y")
    f.write_text(text.replace(str(data), str(other)))
    assert asyncio.run(watcher.check_async())
    assert Loads.built == 3 and len(Loads.loads) == 2 and Loads.loads[-1] != threading.main_thread().name
    f.write_text(text.replace(str(data), str(tmp_path / "missing")))
    assert not asyncio.run(watcher.check_async())  # cannot load: logged, the old scheduler stays
    assert "no such file" in (watcher.last_error or "") and len(applied) == 2


# -- installed plugins -------------------------------------------------------------------------------
def _entry(name: str, value: str) -> metadata.EntryPoint:
    return metadata.EntryPoint(name, value, "epp.plugins")


def test_installed_types_load_on_use_and_broken_ones_are_config_errors() -> None:
    reg = PluginRegistry.with_installed(BUILTIN, lambda: [
        _entry("test-producer", f"{__name__}:Producer"), _entry("missing", "no_such_module_xyz:Thing"),
        _entry("mislabelled", f"{__name__}:Consumer"), _entry("queue-scorer", f"{__name__}:Producer")])
    assert "test-producer" in reg.names() and reg.shadowed == ["queue-scorer"]
    assert reg.get("test-producer", "plugins[0].type").cls is Producer
    assert reg.get("queue-scorer", "x").origin == "epp"  # an installed type cannot replace a built-in one
    with pytest.raises(ConfigError, match=r"plugins\[1\]\.type: .*cannot be imported \(ModuleNotFoundError"):
        reg.get("missing", "plugins[1].type")
    with pytest.raises(ConfigError, match="whose type_name is 'test-consumer'"):
        reg.get("mislabelled", "plugins[2].type")
    with pytest.raises(ConfigError, match=r"unknown plugin type 'nope' \(\d+ types are known; the README"):
        reg.get("nope", "plugins[3].type")
    with pytest.raises(ConfigError, match=r"unknown plugin type 'test-produce' \(did you mean 'test-producer'"):
        reg.get("test-produce", "plugins[3].type")


def test_the_example_package_is_installed_and_parsed_strictly() -> None:
    """tests/plugins/epp-example-plugin, installed by `make venv` as any plugin package would be."""
    names = {ep.name for ep in metadata.entry_points(group="epp.plugins")}
    assert {"preferred-port-scorer", "port-range-filter"} <= names
    good = config("- type: preferred-port-scorer\n  parameters: {port: 8001}\n- type: port-range-filter",
                  "  - {pluginRef: port-range-filter}\n  - {pluginRef: preferred-port-scorer, weight: 5}")
    s, _ = parse_config(good).build()
    assert s.schedule(req(), snap("10.0.0.1:8000", "10.0.0.1:8001", "10.0.0.1:8002")).primary == "10.0.0.1:8001"
    with pytest.raises(ConfigError, match=r"plugins\[0\]\.parameters\.prot: unknown parameter"):
        parse_config(good.replace("port: 8001", "prot: 8001"))
    assert DEFAULT_CONFIG  # the default config needs no installed plugin


@pytest.mark.parametrize("scorer", ["prefix-cache-scorer", "precise-prefix-cache-scorer"])
def test_both_prefix_scorers_read_the_shared_parameters_alike(scorer: str) -> None:
    """The early-2026 index parameters: same names, defaults, bounds and errors on both."""
    text = config(f"- type: {scorer}\n  parameters: {{PARAMS}}", f"  - {{pluginRef: {scorer}, weight: 1}}")
    s, _ = parse_config(text.replace("{PARAMS}", "")).build()
    plugin: Any = s.profile.scorers[0][0]
    holder = plugin.producer if scorer == "prefix-cache-scorer" else plugin.approx  # an older apiVersion
    index = holder.index
    assert (index.block_chars, index.max_blocks, index.lru_capacity) == (64, 256, 31250)
    balance = plugin if scorer == "prefix-cache-scorer" else plugin.approx
    assert (balance.balance_abs, balance.balance_rel) == (4.0, 1.5)
    for bad in ("blockSizeTokens: 0", "lruCapacityPerServer: 1e14", "maxPrefixBlocksToMatch: x",
                "balanceRelThreshold: 0.5"):
        field = bad.split(":")[0]
        with pytest.raises(ConfigError, match=rf"plugins\[0\]\.parameters\.{field}"):
            parse_config(text.replace("PARAMS", bad))


def test_plugin_timing_names_the_extension_point_the_type_and_the_name() -> None:
    text = config("- type: test-only-b\n- name: q\n  type: queue-scorer",
                  "  - {pluginRef: test-only-b}\n  - {pluginRef: q, weight: 1}")
    s, _ = parse_config(text, registry=registry(OnlyB)).build()
    seen: list[tuple[str, str, str]] = []
    s.plugin_timer = lambda point, ptype, name, _secs: seen.append((point, ptype, name))
    for _ in range(8):  # timed on one cycle in 8
        s.schedule(req(), snap("a", "b"))
    assert seen == [("Filter", "test-only-b", "test-only-b"), ("Scorer", "queue-scorer", "q")]


def test_the_data_parallel_handler_validates_its_port_and_one_handler_per_config() -> None:
    from epp.scheduling.plugins import DataParallelProfileHandler

    h = DataParallelProfileHandler("dp", Params({"primaryPort": 9000}, "plugins[0].parameters"))
    assert h.destination(("10.1.1.1:9003", "[fd00::1]:9001")) == (
        ("10.1.1.1:9000", "[fd00::1]:9000"), (("x-data-parallel-host-port", "10.1.1.1:9003"),))
    with pytest.raises(ConfigError, match=r"primaryPort: .*65535"):
        DataParallelProfileHandler("dp", Params({"primaryPort": 70000}, "plugins[0].parameters"))
    two = """
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: queue-scorer
- type: single-profile-handler
- type: data-parallel-profile-handler
schedulingProfiles:
- name: default
  plugins:
  - {pluginRef: queue-scorer, weight: 1}
"""
    with pytest.raises(ConfigError, match=r"plugins\[2\]: a config has one profile handler"):
        parse_config(two)
