import pytest

from epp.signals.mappings import SGLANG, VLLM
from epp.signals.promtext import ParseError, parse_signals


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
