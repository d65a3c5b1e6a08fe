"""The precise prefix scorer: tokenizers, block keys, hybrid pending blocks, the closed loop."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import zmq.asyncio

from epp.blockhash import block_hashes
from epp.datastore.endpoint import EndpointState, EngineSignals
from epp.datastore.store import Snapshot
from epp.requestcontrol.parsing import parse_body
from epp.scheduling.params import Params
from epp.scheduling.precise_index import PendingBlocks
from epp.scheduling.precise_scorer import PreciseCycle, PrecisePrefixCacheScorer
from epp.scheduling.precision import PrecisionTracker
from epp.scheduling.types import ConfigError, CycleState
from epp.signals.kvevents import KVEventManager, KVEventsSpec
from epp.sim.kvevents import KVEventsConfig
from epp.sim.profiles import profile
from epp.sim.server import SimServer
from epp.sim.tokenizer import SimPromptTokenizer
from epp.stack.local import free_port, wait_until
from epp.tokenization import HFPromptTokenizer, TokenizerError

SYSTEM = "You are the support assistant of a large shop. Answer briefly and politely. " * 6


def chat(user: str, model: str = "sim-model", **extra: Any) -> bytes:
    return orjson.dumps({"model": model, "messages": [{"role": "system", "content": SYSTEM},
                                                      {"role": "user", "content": user}], **extra})


def endpoints(*addrs: str, block_size: int = 16) -> list[EndpointState]:
    return [EndpointState(a, EngineSignals(block_size=block_size), scraped_at=0.0) for a in addrs]


def snapshot(eps: list[EndpointState], now: float = 0.0) -> Snapshot:
    return Snapshot(tuple(eps), {}, {}, now, 2.0)


def scorer(**params: Any) -> PrecisePrefixCacheScorer:
    sc = PrecisePrefixCacheScorer("precise", Params({"tokenizer": "sim", **params}, "plugins[0].parameters"))
    sc.load()
    return sc


def state(sc: PrecisePrefixCacheScorer, cycle: CycleState) -> PreciseCycle:
    st = cycle.get(sc.cycle_slot)
    assert st is not None
    return st


def score(sc: PrecisePrefixCacheScorer, body: bytes, eps: list[EndpointState], now: float = 0.0,
          path: str = "/v1/chat/completions") -> tuple[list[float], CycleState]:
    cycle = CycleState()
    req = parse_body("r", path, {}, body)
    return sc.score(req, snapshot(eps, now), eps, cycle), cycle


def keys_of(body: bytes, block_size: int = 16, **kw: Any) -> list[int]:
    ids = SimPromptTokenizer().token_ids(orjson.loads(body), True)
    assert ids is not None
    return block_hashes(ids, block_size, **kw)


def test_reported_blocks_win_and_partial_matches_score_partially() -> None:
    sc = scorer()
    eps = endpoints("10.0.0.1:8000", "10.0.0.2:8000", "10.0.0.3:8000")
    body = chat("where is my parcel?")
    keys = keys_of(body)
    sc.index.stored("10.0.0.2:8000", keys)
    sc.index.stored("10.0.0.3:8000", keys[: len(keys) // 2])
    scores, cycle = score(sc, body, eps)
    assert scores[0] == 0.0 and scores[1] == 1.0 and 0.4 < scores[2] < 0.6
    st = state(sc, cycle)
    assert st.used == "precise"
    n_tokens = len(SimPromptTokenizer().token_ids(orjson.loads(body), True) or [])
    assert st.predicted["10.0.0.2:8000"] == min(len(keys) * 16, (n_tokens - 1) // 16 * 16)


def test_block_size_comes_from_the_pods_metrics_unless_configured() -> None:
    body = chat("hello")
    eps = endpoints("a:1", block_size=32)
    sc = scorer()
    sc.index.stored("a:1", keys_of(body, 32))
    assert score(sc, body, eps)[0] == [1.0]
    fixed = scorer(blockSize=16)
    fixed.index.stored("a:1", keys_of(body, 32))
    assert score(fixed, body, eps)[0] == [0.0]


def test_lora_and_cache_salt_are_part_of_the_keys() -> None:
    sc = scorer(loraAdapters={"sql-lora": "/adapters/sql"})
    eps = endpoints("a:1", "b:1")
    body = chat("q", model="sql-lora")
    sc.index.stored("a:1", keys_of(body))  # base-model keys: not the adapter's blocks
    sc.index.stored("b:1", keys_of(body, lora=("sql-lora", "/adapters/sql")))
    assert score(sc, body, eps)[0] == [0.0, 1.0]
    salted = chat("q", cache_salt="tenant-1")
    sc.index.stored("a:1", keys_of(salted, cache_salt="tenant-1"))
    assert score(sc, salted, eps)[0] == [1.0, 0.0]


def test_hybrid_counts_recent_picks_until_they_expire() -> None:
    sc = scorer(pendingTtl="2s")
    eps = endpoints("a:1", "b:1")
    body = chat("new prefix")
    scores, cycle = score(sc, body, eps, now=100.0)
    assert scores == [0.0, 0.0]
    sc.on_pick("b:1", cycle)
    scores, cycle = score(sc, body, eps, now=101.0)
    assert scores == [0.0, 1.0]
    assert state(sc, cycle).unconfirmed == {"b:1": len(keys_of(body))}
    assert score(sc, body, eps, now=103.5)[0] == [0.0, 0.0]
    precise_only = scorer(mode="precise")
    _, cycle = score(precise_only, body, eps, now=100.0)
    precise_only.on_pick("b:1", cycle)
    assert score(precise_only, body, eps, now=100.5)[0] == [0.0, 0.0]


def test_closed_loop_falls_back_to_the_approximate_index_and_recovers() -> None:
    sc = scorer(fallback={"window": 8, "minSamples": 4, "minPrecision": 0.5, "recoverPrecision": 0.8})
    eps = endpoints("a:1", "b:1")
    body = chat("a question that repeats")
    keys = keys_of(body)
    sc.index.stored("a:1", keys)
    _, cycle = score(sc, body, eps)
    predicted = state(sc, cycle).predicted["a:1"]
    for _ in range(4):  # the pod reports nothing cached: the index is wrong
        sc.on_usage("a:1", cycle, 0)
    assert not sc.tracker.trusted
    # Approximate now: a:1 has never been sent this prompt by epp, b:1 has.
    _, c2 = score(sc, body, eps)
    sc.on_pick("b:1", c2)
    scores, c3 = score(sc, body, eps)
    assert state(sc, c3).used == "approximate" and scores[1] > scores[0]
    for _ in range(8):  # shadow predictions keep being checked; they are right again
        sc.on_usage("a:1", cycle, predicted)
    assert sc.tracker.trusted and state(sc, score(sc, body, eps)[1]).used == "precise"
    assert sc.tracker.totals.fallbacks == 1 and sc.tracker.totals.recoveries == 1


def test_pending_predictions_count_only_when_the_pod_never_reports_them() -> None:
    sc = scorer()
    eps = endpoints("a:1")
    body = chat("burst")
    _, c = score(sc, body, eps)
    sc.on_pick("a:1", c)
    _, c2 = score(sc, body, eps)
    sc.index.stored("a:1", keys_of(body))  # the events arrive after the second request was scored
    for _ in range(40):
        sc.on_usage("a:1", c2, 500)
    assert sc.tracker.totals.samples == 0  # the index was behind, not wrong
    other = scorer()
    _, c = score(other, body, eps)
    other.on_pick("a:1", c)
    _, c2 = score(other, body, eps)
    for _ in range(20):  # never reported (e.g. a hash mismatch): evidence against the index
        other.on_usage("a:1", c2, 500)
    assert other.tracker.totals.samples == 20 and not other.tracker.trusted


def test_untokenizable_requests_and_no_tokenizer_use_the_approximate_index() -> None:
    sc = scorer()
    eps = endpoints("a:1")
    body = orjson.dumps({"model": "m", "prompt": [[1, 2], [3, 4]]})  # two prompts: not reproduced
    _, cycle = score(sc, body, eps, path="/v1/completions")
    assert state(sc, cycle).hashes is None and state(sc, cycle).used == "approximate"
    plain = PrecisePrefixCacheScorer("p", Params({}, "x"))
    plain.load()
    assert not plain.usage_wanted()
    _, cycle = score(plain, chat("x"), eps)
    assert state(plain, cycle).used == "approximate"


def test_config_errors_name_the_field() -> None:
    with pytest.raises(ConfigError, match=r"parameters\.mode"):
        scorer(mode="exact")
    with pytest.raises(ConfigError, match=r"parameters\.kvEvents\.endpoint"):
        scorer(kvEvents={"topic": "kv"})
    with pytest.raises(ConfigError, match=r"parameters\.kvEvents\.port"):
        scorer(kvEvents={"endpoint": "tcp://{ip}:5557", "port": 1})
    with pytest.raises(ConfigError, match=r"parameters\.tokenizer.*tokenizer\.json"):
        scorer(tokenizer="/nonexistent/dir")
    with pytest.raises(ConfigError, match=r"parameters\.pendingTtl"):
        scorer(pendingTtl="soon")


def test_precision_tracker_window() -> None:
    t = PrecisionTracker(window=4, min_samples=2, min_precision=0.5, recover_precision=0.9)
    assert t.add(0, 0) is None and t.precision is None
    t.add(64, 64)
    assert t.precision == 1.0
    t.add(64, 0)
    assert t.precision == 0.5 and t.trusted
    assert t.add(64, 0) is not None and not t.trusted  # 64/192
    for _ in range(3):
        t.add(32, 32)
    assert not t.trusted and t.precision == 0.6  # (64, 0) is still in the window
    t.add(32, 32)
    assert t.trusted and t.precision == 1.0  # the window forgot the misses


def test_pending_blocks_expire_and_are_bounded() -> None:
    p = PendingBlocks(ttl=1.0, max_blocks=3)
    p.record("a", [1, 2], now=0.0)
    p.record("b", [1, 2], now=0.5)
    assert p.size() == 3 and p.match_lengths([1, 2], now=0.6) == {"b": 2}
    assert p.match_lengths([1, 2], now=2.0) == {} and p.size() == 0


# -- tokenizers ---------------------------------------------------------------------------------


def hf_dir(d: Path, template: str | None) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {w: i for i, w in enumerate(["<s>", "</s>", "<unk>", "USER", "BOT", "hello", "world", "!", ":"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<s>", "</s>"])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tok.save(str(d / "tokenizer.json"))
    cfg: dict[str, Any] = {"bos_token": {"content": "<s>"}, "eos_token": "</s>"}
    if template is not None:
        cfg["chat_template"] = template
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    return d


TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ m['role'] | upper }} {{ m['content'] }} {% endfor %}"
            "{% if add_generation_prompt %}BOT :{% endif %}")


def test_hf_tokenizer_renders_the_chat_template_like_the_server(tmp_path: Path) -> None:
    tok = HFPromptTokenizer(str(hf_dir(tmp_path, TEMPLATE)))
    ids = tok.token_ids({"messages": [{"role": "user", "content": "hello world"}]}, chat=True)
    assert ids == [0, 3, 5, 6, 4, 8]  # the template's BOS only: chat is encoded without special tokens
    # Completions add the tokenizer's special tokens; token-id prompts pass through.
    assert tok.token_ids({"prompt": "hello !"}, chat=False) == [0, 5, 7]
    assert tok.token_ids({"prompt": [5, 6]}, chat=False) == [5, 6]
    # Text parts are joined with newlines; an image part cannot be reproduced.
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "hello"},
                                                        {"type": "text", "text": "world"}]}]}
    assert tok.token_ids(parts, chat=True) == ids
    image = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}
    assert tok.token_ids(image, chat=True) is None
    assert tok.token_ids({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]},
                         chat=True) is None


def test_hf_tokenizer_errors(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match=r"tokenizer\.json"):
        HFPromptTokenizer(str(tmp_path))
    (tmp_path / "t").mkdir()
    with pytest.raises(TokenizerError, match="does not compile"):
        HFPromptTokenizer(str(hf_dir(tmp_path / "t", "{% for %}")))
    (tmp_path / "u").mkdir()
    no_template = HFPromptTokenizer(str(hf_dir(tmp_path / "u", None)))
    assert no_template.token_ids({"messages": [{"role": "user", "content": "hello"}]}, chat=True) is None
    assert no_template.token_ids({"prompt": "hello"}, chat=False) == [0, 5]


# -- against the simulator's real events ----------------------------------------------------------


async def test_keys_match_what_a_sim_server_publishes_and_the_manager_follows_the_pool() -> None:
    ctx = zmq.asyncio.Context()
    with tempfile.TemporaryDirectory() as d:
        cfg = KVEventsConfig(True, "zmq", f"ipc://{d}/kv-{{port}}.sock", f"ipc://{d}/replay-{{port}}.sock")
        server = SimServer(free_port(), profile("fast"), kv_events=cfg, zmq_ctx=ctx)
        await server.start()
        sc = scorer(kvEvents={"endpoint": f"ipc://{d}/kv-{{port}}.sock",
                              "replayEndpoint": f"ipc://{d}/replay-{{port}}.sock"})
        assert sc.kv_events is not None
        manager = KVEventManager(ctx)
        try:
            await manager.sync(sc.kv_events, sc.index, {server.address})
            body = chat("how do I return an item?")
            async with aiohttp.ClientSession() as s, s.post(f"http://{server.address}/v1/chat/completions",
                                                            data=body, headers={"content-type": "application/json"},
                                                            ) as r:
                assert r.status == 200
                usage = (await r.json())["usage"]

            async def stored() -> bool:
                return sc.index.blocks_of(server.address) > 0

            await wait_until(stored, 5, "KV events in the index")
            eps = endpoints(server.address, "10.9.9.9:1", block_size=server.params.block_size)
            scores, cycle = score(sc, body, eps)
            assert scores == [1.0, 0.0]
            # The next identical request: the server reports exactly the cached tokens we predict.
            predicted = state(sc, cycle).predicted[server.address]
            async with aiohttp.ClientSession() as s, s.post(f"http://{server.address}/v1/chat/completions",
                                                            data=body, headers={"content-type": "application/json"},
                                                            ) as r:
                assert (await r.json())["usage"]["prompt_tokens_details"]["cached_tokens"] == predicted > 0
            assert usage["prompt_tokens"] > predicted
            await manager.sync(sc.kv_events, sc.index, set())  # the pod left the pool
            assert sc.index.blocks_of(server.address) == 0 and not manager.subscribers
            assert manager.totals().batches > 0
        finally:
            await manager.close()
            await server.stop()
            ctx.term()


def test_per_endpoint_addresses_override_the_template() -> None:
    sc = scorer(kvEvents={"endpoint": "tcp://{ip}:5557",
                          "perEndpoint": {"10.0.0.9:8000": {"endpoint": "tcp://10.0.0.9:6000",
                                                            "replayEndpoint": "tcp://10.0.0.9:6001"}}})
    assert sc.kv_events is not None
    assert sc.kv_events.source_for("10.0.0.9:8000").endpoint == "tcp://10.0.0.9:6000"
    assert sc.kv_events.source_for("10.0.0.9:8000").replay_endpoint == "tcp://10.0.0.9:6001"
    assert sc.kv_events.source_for("10.0.0.1:8000").endpoint == "tcp://10.0.0.1:5557"
    with pytest.raises(ConfigError, match=r"perEndpoint\.10\.0\.0\.9:8000\.endpoint"):
        scorer(kvEvents={"endpoint": "tcp://{ip}:5557", "perEndpoint": {"10.0.0.9:8000": {"replayEndpoint": "x"}}})


def test_event_endpoint_templates() -> None:
    spec = KVEventsSpec("tcp://{ip}:5557", "tcp://{ip}:{port+1}", "kv")
    src = spec.source_for("10.1.2.3:8000")
    assert (src.endpoint, src.replay_endpoint, src.topic, src.pod) == ("tcp://10.1.2.3:5557", "tcp://10.1.2.3:8001",
                                                                        "kv", "10.1.2.3:8000")
    assert KVEventsSpec("tcp://{ip}:5557").source_for("[fd00::1]:8000").endpoint == "tcp://[fd00::1]:5557"
