import pytest

from epp.signals.mappings import SGLANG, VLLM
from epp.signals.promtext import LayoutMemo, ParseError, families, parse_signals, series_lines


def test_reads_a_real_vllm_exposition(vllm_metrics_text: str) -> None:
    sig = parse_signals(vllm_metrics_text, VLLM)
    assert sig.block_size == 32 and sig.num_gpu_blocks == 48
    assert sig.waiting == 0 and sig.running == 0 and 0 <= sig.kv_usage <= 1


def test_sums_engines_and_ignores_series_routing_does_not_read() -> None:
    text = "\n".join([
        '# TYPE vllm:num_requests_waiting gauge',
        'vllm:num_requests_waiting{engine="0",model_name="m"} 3.0',
        'vllm:num_requests_waiting{engine="1",model_name="m"} 4.0',
        'vllm:num_requests_running{engine="0",model_name="m"} 1',
        'vllm:num_requests_running{engine="1",model_name="m"} 2',
        'vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.2',
        'vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.4',
        'vllm:lora_requests_info{max_lora="2",running_lora_adapters="old",waiting_lora_adapters=""} 100.0',
        'vllm:lora_requests_info{max_lora="2",running_lora_adapters="a,b",waiting_lora_adapters="c"} 200.0',
    ])
    sig = parse_signals(text, VLLM)
    assert (sig.waiting, sig.running) == (7, 3)
    assert sig.kv_usage == pytest.approx(0.3)
    assert sig.models == ("m",)


def test_missing_core_gauges_is_an_error() -> None:
    with pytest.raises(ParseError, match="vllm:kv_cache_usage_perc"):
        parse_signals('vllm:num_requests_waiting{} 1\nvllm:num_requests_running{} 1\n', VLLM)


def test_sglang_mapping() -> None:
    sig = parse_signals("sglang:num_queue_reqs 5\nsglang:num_running_reqs 2\nsglang:token_usage 0.5\n", SGLANG)
    assert (sig.waiting, sig.running, sig.kv_usage) == (5, 2, 0.5)


def test_first_line_and_names_that_prefix_other_series() -> None:
    text = ('vllm:num_requests_waiting{engine="0"} 2\n'
            'vllm:num_requests_waiting_by_reason{engine="0",reason="capacity"} 99\n'
            "vllm:num_requests_running 1\nvllm:kv_cache_usage_perc 0.5")
    sig = parse_signals(text, VLLM)
    assert (sig.waiting, sig.running, sig.kv_usage) == (2, 1, 0.5)


def test_vllm_ignores_prometheus_name_filters() -> None:
    """Recorded fact: vLLM 0.32's /metrics?name[]=... returns the full exposition, so epp scrapes
    plain /metrics and relies on a cheap reader instead of server-side filtering."""
    from tests.conftest import FIXTURES

    filtered = (FIXTURES / "metrics_filtered.txt").read_text()
    full = (FIXTURES / "metrics.txt").read_text()
    assert "vllm:e2e_request_latency_seconds_bucket" in filtered  # a series that was not asked for
    assert abs(len(filtered) - len(full)) < 0.05 * len(full)
    assert parse_signals(filtered, VLLM) == parse_signals(full, VLLM)


def test_families_cut_at_type_lines_and_a_series_is_read_from_its_own() -> None:
    text = "\n".join([
        "# TYPE vllm:num_requests_running gauge",
        'vllm:num_requests_running{engine="0"} 1',
        "# HELP vllm:num_requests_waiting Waiting.",
        "# TYPE vllm:num_requests_waiting gauge",
        'vllm:num_requests_waiting{engine="0"} 2',
        "# TYPE vllm:kv_cache_usage_perc gauge",
        'vllm:kv_cache_usage_perc{engine="0"} 0.5',
    ])
    fams = families(text)
    assert list(fams) == ["vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"]
    assert fams["vllm:num_requests_waiting"].startswith("vllm:num_requests_waiting gauge\n")
    assert series_lines(text, fams, "vllm:num_requests_waiting") == ['vllm:num_requests_waiting{engine="0"} 2']
    assert families("vllm:num_requests_running 1\n") == {}


def test_series_no_type_line_declares_are_still_read_in_a_typed_exposition() -> None:
    """An untyped series may sit anywhere, even inside another family's lines: the full search finds it."""
    text = "\n".join([
        "# TYPE other gauge",
        "other 1",
        "vllm:num_requests_waiting 4",  # untyped, inside other's lines
        "# TYPE vllm:num_requests_running gauge",
        "vllm:num_requests_running 3",
        "vllm:kv_cache_usage_perc 0.25",
        "# TYPE vllm:kv_cache_usage_perc gauge",  # declared after its sample: not well formed, still read
    ])
    sig = parse_signals(text, VLLM)
    assert (sig.waiting, sig.running, sig.kv_usage) == (4, 3, 0.25)


def test_a_family_declared_twice_reads_every_sample() -> None:
    text = "\n".join([
        "# TYPE vllm:num_requests_waiting gauge", 'vllm:num_requests_waiting{engine="0"} 1',
        "# TYPE vllm:num_requests_running gauge", "vllm:num_requests_running 0",
        "# TYPE vllm:num_requests_waiting gauge", 'vllm:num_requests_waiting{engine="1"} 2',
        "vllm:kv_cache_usage_perc 0",
    ])
    assert families(text)["vllm:num_requests_waiting"] is None  # not well formed: the whole text is searched
    assert parse_signals(text, VLLM).waiting == 3


def _typed(waiting: str = "1", running: str = "2", kv: str = "0.5", before: str = "", lora: str = "") -> str:
    return "".join([
        before,
        "# HELP h a histogram\n# TYPE h histogram\n", "".join(f'h_bucket{{le="{i}"}} {waiting}\n' for i in range(5)),
        f"# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running{{model_name=\"m\"}} {running}\n",
        f"# TYPE vllm:num_requests_waiting gauge\nvllm:num_requests_waiting{{model_name=\"m\"}} {waiting}\n",
        f"# TYPE vllm:kv_cache_usage_perc gauge\nvllm:kv_cache_usage_perc{{model_name=\"m\"}} {kv}\n",
        lora,
    ])


def test_a_layout_memo_reads_near_the_last_places_and_agrees_with_a_full_read() -> None:
    memo = LayoutMemo(recheck=5)
    first = parse_signals(_typed(), VLLM, memo=memo)
    assert memo.left == 5 and "vllm:num_requests_waiting" in memo.places and "vllm:lora_requests_info" in memo.absent
    assert (first.waiting, first.running) == (1, 2)
    for waiting in ("12345", "7", "987654"):  # numbers of other lengths move every family a little
        text = _typed(waiting=waiting, running=waiting)
        assert parse_signals(text, VLLM, memo=memo) == parse_signals(text, VLLM)
    assert memo.left == 2  # three read near their places


def test_a_layout_memo_reads_in_full_when_families_move_far_or_go() -> None:
    memo = LayoutMemo(recheck=100)
    parse_signals(_typed(), VLLM, memo=memo)
    moved = _typed(waiting="3", before="# TYPE pad gauge\n" + "pad 1\n" * 400)  # ~2.4 KB earlier
    assert parse_signals(moved, VLLM, memo=memo).waiting == 3 and memo.left == 100  # read in full again
    gone = moved.replace("vllm:kv_cache_usage_perc{", "other{")  # the family declared, its samples gone
    with pytest.raises(ParseError, match="vllm:kv_cache_usage_perc"):
        parse_signals(gone, VLLM, memo=memo)


def test_an_undeclared_series_that_appears_is_read_within_the_recheck() -> None:
    memo = LayoutMemo(recheck=3)
    parse_signals(_typed(), VLLM, memo=memo)
    lora = 'vllm:lora_requests_info{max_lora="1",running_lora_adapters="a",waiting_lora_adapters=""} 1\n'
    seen = [parse_signals(_typed(lora=lora), VLLM, memo=memo).active_adapters for _ in range(4)]
    assert seen[:3] == [frozenset()] * 3 and seen[3] == frozenset({"a"})  # late by at most 3 scrapes
