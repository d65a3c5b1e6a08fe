"""The reference's data-layer plugin types: metrics-data-source (HTTP/HTTPS, path, port, TLS) and
core-metrics-extractor (engines, per-pod engine label, engine configs), against real HTTP servers."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from epp.config import build, load_config, parse_config
from epp.datalayer import CoreMetricsExtractor, MetricsDataSource
from epp.datastore.store import Datastore
from epp.scheduling.types import ConfigError
from epp.server.tls import self_signed
from epp.signals.mappings import ENGINES, EngineMapping
from epp.signals.promtext import parse_signals
from epp.signals.scraper import Scraper
from epp.stack.local import free_ports

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "reference"
VLLM_TEXT = ('vllm:num_requests_waiting{model_name="m"} 3\nvllm:num_requests_running{model_name="m"} 1\n'
             'vllm:kv_cache_usage_perc{model_name="m"} 0.25\n')
SGLANG_TEXT = "sglang:num_queue_reqs 7\nsglang:num_running_reqs 2\nsglang:token_usage 0.5\n"
TRITON_TRTLLM_TEXT = "\n".join([
    'nv_trt_llm_request_metrics{model="x",request_type="waiting"} 4',
    'nv_trt_llm_request_metrics{model="x",request_type="scheduled"} 6',
    'nv_trt_llm_request_metrics{model="x",request_type="context"} 99',
    'nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="fraction"} 0.75',
    'nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="tokens_per"} 64',
    'nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="max"} 1000', ""])
CONFIG = """apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: queue-scorer
- type: metrics-data-source
  parameters: {PARAMS}
- type: core-metrics-extractor
  parameters: {EXTRACTOR}
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: queue-scorer
"""


def config(params: str = "{}", extractor: str = "{}") -> str:
    return CONFIG.replace("{PARAMS}", params).replace("{EXTRACTOR}", extractor)


def test_the_reference_charts_default_config_loads_and_builds_its_data_layer() -> None:
    built = build(load_config(str(FIXTURES / "chart-default-plugins.yaml")))
    assert [(s.name, w) for s, w in built.scheduler.profile.scorers] == [
        ("queue-scorer", 2.0), ("kv-cache-utilization-scorer", 2.0), ("prefix-cache-scorer", 3.0)]
    source, extractor = built.data_layer()
    assert isinstance(source, MetricsDataSource) and isinstance(extractor, CoreMetricsExtractor)
    target = source.scrape_target()
    assert (target.path, target.port, target.tls) == ("/metrics", None, None)
    assert extractor.engine_mapping().default == "vllm"


def test_builtin_engines_read_their_series_with_label_matchers() -> None:
    sig = parse_signals(TRITON_TRTLLM_TEXT, ENGINES["triton-tensorrt-llm"])
    assert (sig.waiting, sig.running, sig.kv_usage, sig.block_size, sig.num_gpu_blocks) == (4, 6, 0.75, 64, 1000)
    triton = parse_signals("nv_inference_pending_request_count 2\nnv_inference_exec_count 5\n", ENGINES["triton"])
    assert (triton.waiting, triton.running, triton.kv_usage) == (2, 5, 0.0)  # no KV series: read as 0


def test_engine_configs_add_or_replace_engines_and_refuse_what_epp_cannot_use() -> None:
    mapping = build(parse_config(config(extractor='{defaultEngine: mine, engineConfigs: [{name: mine, '
                                                  'queuedRequestsSpec: "q{status=waiting}", '
                                                  'runningRequestsSpec: "q{status=running}", kvUsageSpec: kv}, '
                                                  '{name: vllm, kvUsageSpec: "vllm:gpu_cache_usage_perc"}]}'))
                    ).data_layer()[1]
    assert isinstance(mapping, CoreMetricsExtractor)
    m = mapping.engine_mapping()
    sig = parse_signals('q{status="waiting"} 5\nq{status="running"} 2\nq{status="done"} 50\nkv 0.1\n',
                        m.for_labels({}))
    assert (sig.waiting, sig.running, sig.kv_usage) == (5, 2, 0.1)
    vllm = m.engines["vllm"]
    assert vllm.kv_usage is not None and vllm.kv_usage.name == "vllm:gpu_cache_usage_perc"
    assert vllm.waiting.name == "vllm:num_requests_waiting"  # the rest of the built-in stays
    for bad, message in (('{defaultEngine: tgi}', "unknown engine 'tgi'"),
                         ('{engineConfigs: [{name: default, queuedRequestsSpec: a, runningRequestsSpec: b}]}',
                          "'default' is reserved"),
                         ('{engineConfigs: [{name: x, queuedRequestsSpec: a}]}', "runningRequestsSpec are required"),
                         ('{engineConfigs: [{name: vllm, loraSpec: "l{"}]}', "loraSpec: .* is not a metric spec"),
                         ('{engineConfigs: [{name: vllm, customMetrics: [{attributeKey: a, metricSpec: b}]}]}',
                          "customMetrics: not supported by epp"),
                         ('{engineConfigs: [{name: x, queuedRequestsSpec: "a{b}", runningRequestsSpec: c}]}',
                          "not label=value"),
                         ('{engineLabel: x}', "engineLabel: unknown parameter")):
        with pytest.raises(ConfigError, match=message):
            parse_config(config(extractor=bad))


def test_the_pods_engine_label_chooses_its_metric_names() -> None:
    m = EngineMapping(ENGINES, "vllm", "llm-d.ai/engine-type")
    assert m.for_labels({"llm-d.ai/engine-type": "sglang"}).engine == "sglang"
    assert m.for_labels({"inference.networking.k8s.io/engine-type": "sglang"}).engine == "sglang"
    assert m.for_labels({"llm-d.ai/engine-type": "unknown"}).engine == "vllm"
    assert m.for_labels({}).engine == "vllm"


def test_data_source_parameters_are_strict() -> None:
    for bad, message in (("{scheme: ftp}", "scheme: must be one of http, https"),
                         ("{port: 70000}", "port: must be <= 65535"), ("{path: metrics}", "must start with '/'"),
                         ("{clientCertPath: /c}", "go together"), ("{caCertPath: /ca}", "need scheme: https"),
                         ("{interval: soon}", "interval")):
        with pytest.raises(ConfigError, match=message):
            parse_config(config(bad))
    with pytest.raises(ConfigError, match="cannot load the TLS files"):
        build(parse_config(config("{scheme: https, caCertPath: /nonexistent/ca.pem}")))
    with pytest.raises(ConfigError, match="a second data source"):
        parse_config(config().replace("- type: core-metrics-extractor",
                                      "- type: metrics-data-source\n  name: two\n- type: core-metrics-extractor"))


# -- scraping real servers ----------------------------------------------------------------------------------
@pytest.fixture
async def servers(tmp_path: Path) -> AsyncIterator[dict[str, object]]:
    """A vLLM-like server on HTTP at /metrics, an SGLang-like one on HTTPS at /custom on another port."""
    key, crt = self_signed()
    (tmp_path / "tls.key").write_bytes(key)
    (tmp_path / "tls.crt").write_bytes(crt)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(tmp_path / "tls.crt", tmp_path / "tls.key")
    plain, secure, other = free_ports(3)
    async def vllm(_r: web.Request) -> web.Response:
        return web.Response(text=VLLM_TEXT)

    async def sglang(_r: web.Request) -> web.Response:
        return web.Response(text=SGLANG_TEXT)

    app = web.Application()
    app.router.add_get("/metrics", vllm)
    app.router.add_get("/custom", sglang)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", plain).start()
    await web.TCPSite(runner, "127.0.0.1", secure, ssl_context=ctx).start()
    yield {"plain": plain, "secure": secure, "other": other, "ca": str(tmp_path / "tls.crt")}
    await runner.cleanup()


async def scrape(text: str, address: str, labels: dict[str, str] | None = None) -> tuple[object, str | None]:
    built = build(parse_config(text))
    source, extractor = built.data_layer()
    assert source is not None and extractor is not None
    store = Datastore()
    store.set_endpoints([address], {address: labels or {}})
    scraper = Scraper(store, extractor.engine_mapping(), target=source.scrape_target())
    await scraper.scrape_once(address)  # on a connection of its own, closed after
    state = store.get(address)
    assert state is not None
    return state.signals, state.error


async def test_http_https_path_port_and_the_pods_engine(servers: dict[str, object]) -> None:
    plain, secure, other = servers["plain"], servers["secure"], servers["other"]
    sig, err = await scrape(config(), f"127.0.0.1:{plain}")
    assert err is None and sig is not None and sig.waiting == 3  # type: ignore[attr-defined]
    # The endpoint's own port is not where the metrics are: the data source's port and path are.
    https = config(f"{{scheme: https, path: /custom, port: {secure}}}")
    sig, err = await scrape(https, f"127.0.0.1:{other}", {"llm-d.ai/engine-type": "sglang"})
    assert err is None and sig.waiting == 7 and sig.kv_usage == 0.5  # type: ignore[attr-defined]
    # Verification on: the self-signed certificate fails, unless its CA is given.
    strict = config(f"{{scheme: https, path: /custom, port: {secure}, insecureSkipVerify: false}}")
    _, err = await scrape(strict, f"127.0.0.1:{other}", {"llm-d.ai/engine-type": "sglang"})
    assert err is not None and "certificate" in err.lower()
    trusted = config(f"{{scheme: https, path: /custom, port: {secure}, insecureSkipVerify: false, "
                     f"caCertPath: {servers['ca']}}}")
    sig, err = await scrape(trusted, f"127.0.0.1:{other}", {"llm-d.ai/engine-type": "sglang"})
    assert err is None and sig.waiting == 7  # type: ignore[attr-defined]
    # An sglang exposition read with vLLM's names (no label) is a clear failure, not zeros.
    _, err = await scrape(config(f"{{path: /custom, port: {plain}}}"), f"127.0.0.1:{other}")
    assert err is not None and "vllm:num_requests_waiting" in err


DATA_LAYER = """apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: queue-scorer
- {name: scrape, type: metrics-data-source, parameters: {path: /stats}}
- {name: vllm, type: core-metrics-extractor}
dataLayer:
  SECTION
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: queue-scorer
"""


def data_layer(section: str) -> str:
    return DATA_LAYER.replace("SECTION", section.replace("\n", "\n  "))


def test_the_data_layer_section_names_the_source_and_its_extractor() -> None:
    built = build(parse_config(data_layer("sources:\n- pluginRef: scrape\n  extractors: [{pluginRef: vllm}]")))
    source, extractor = built.data_layer()
    assert isinstance(source, MetricsDataSource) and source.scrape_target().path == "/stats"
    assert isinstance(extractor, CoreMetricsExtractor)
    # No sources: the ones under plugins, as the reference's default injection finds them.
    source, _ = build(parse_config(data_layer("injectDefaults: true"))).data_layer()
    assert isinstance(source, MetricsDataSource)


@pytest.mark.parametrize(("section", "error"), [
    ("discovery: {pluginRef: file-discovery}", r"dataLayer\.discovery\.pluginRef: no plugin named 'file-discovery'"),
    ("discovery: {pluginRef: scrape}", r"dataLayer\.discovery\.pluginRef: 'scrape' is a data source, not a discovery"),
    ("crossReplicaSyncerPluginRef: redis", r"dataLayer\.crossReplicaSyncerPluginRef: not supported by epp"),
    ("sources:\n- pluginRef: vllm", r"dataLayer\.sources\[0\]\.pluginRef: 'vllm' is a metrics extractor, not a data"),
    ("sources:\n- pluginRef: scrape\n  extractors: [{pluginRef: nope}]",
     r"dataLayer\.sources\[0\]\.extractors\[0\]\.pluginRef: no plugin named 'nope'"),
    ("sources:\n- pluginRef: scrape", r"plugins\[2\]: metrics extractor 'vllm' is not named in dataLayer\.sources"),
    ("sources:\n- {pluginRef: scrape, extractor: []}", r"dataLayer\.sources\[0\]\.extractor: unknown field"),
    ("injectDefaults: maybe", r"dataLayer\.injectDefaults: expected true or false"),
    ("sourcez: []", r"dataLayer\.sourcez: unknown field"),
])
def test_the_data_layer_section_is_strict(section: str, error: str) -> None:
    with pytest.raises(ConfigError, match=error):
        parse_config(data_layer(section))


def test_no_metrics_source_at_all_is_refused() -> None:
    text = data_layer("injectDefaults: false").replace("- {name: scrape, type: metrics-data-source, "
                                                        "parameters: {path: /stats}}\n", "")
    with pytest.raises(ConfigError, match=r"dataLayer\.injectDefaults: false with no metrics source is not supported"):
        parse_config(text)


def test_the_references_dp_sample_loads_and_routes_ranks_through_the_primary_port() -> None:
    from epp.datastore.endpoint import EndpointState, EngineSignals
    from epp.datastore.store import Snapshot
    from epp.request import InferenceRequest

    s, _ = load_config(str(FIXTURES / "dp-epp-config.yaml")).build()
    ranks = tuple(EndpointState(f"10.0.0.7:{8000 + i}", EngineSignals(), scraped_at=1.0) for i in range(4))
    d = s.schedule(InferenceRequest("r", "/v1/completions", model="m", prompt="hello"),
                   Snapshot(ranks, {}, {}, 1.0, 2.0))
    assert d.primary.startswith("10.0.0.7:80") and d.targets == ("10.0.0.7:8000",)
    assert d.request_headers == (("x-data-parallel-host-port", d.primary),)


async def test_the_running_scrape_cycle_reads_https_on_the_sources_port(servers: dict[str, object]) -> None:
    """The timed cycle (not only a one-off scrape) connects with TLS to the data source's port and path."""
    built = build(parse_config(config(f"{{scheme: https, path: /custom, port: {servers['secure']}}}")))
    source, extractor = built.data_layer()
    assert source is not None and extractor is not None
    address = f"127.0.0.1:{servers['other']}"
    store = Datastore()
    store.set_endpoints([address], {address: {"llm-d.ai/engine-type": "sglang"}})
    scraper = Scraper(store, extractor.engine_mapping(), interval=0.02, target=source.scrape_target())
    await scraper.start()
    try:
        for _ in range(200):
            state = store.get(address)
            if state is not None and state.signals is not None:
                break
            await asyncio.sleep(0.02)
        assert state is not None and state.error is None and state.signals is not None and state.signals.waiting == 7
    finally:
        await scraper.stop()
