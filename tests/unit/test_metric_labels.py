"""Client-chosen strings never grow /metrics without bound (the request's ``model``)."""

from __future__ import annotations

from prometheus_client import generate_latest

from epp.config import load_config
from epp.datastore.endpoint import EngineSignals
from epp.datastore.store import Datastore
from epp.observability.metrics import OTHER, LabelValues, PickerMetrics
from epp.requestcontrol.director import Director
from epp.requestcontrol.policies import RequestPolicies
from epp.requestcontrol.routed import RequestInput


def test_known_values_pass_others_are_admitted_up_to_the_limit() -> None:
    pool = {"served"}
    now = [0.0]
    labels = LabelValues(lambda: pool, limit=2, max_length=10, clock=lambda: now[0])
    labels.set_configured({"rewritten"})
    assert labels("served") == "served" and labels("rewritten") == "rewritten"
    assert [labels(v) for v in ("a", "b", "c", "a")] == ["a", "b", OTHER, "a"]
    assert labels("x" * 11) == OTHER
    pool.add("new-model")
    now[0] = 2.0  # the pool's models are re-read at most once a second
    assert labels("new-model") == "new-model"


def service() -> Director:
    store = Datastore()
    store.set_endpoints(["10.0.0.1:8000"])
    store.record_scrape("10.0.0.1:8000", EngineSignals(models=("llama",)), 0)
    scheduler, _ = load_config(None).build()
    return Director(store, scheduler, PickerMetrics(store, label_values=8))


def test_300_long_model_names_keep_the_exposition_small() -> None:
    picks = service()
    before = len(generate_latest(picks.metrics.prepare()))  # type: ignore[arg-type]
    for i in range(300):
        name = f"{i:04d}" + "m" * 2048
        picks.route(RequestInput({}, "/v1/completions", model=name, prompt="hi")).finish()
    picks.route(RequestInput({}, "/v1/completions", model="llama", prompt="hi")).finish()
    text = generate_latest(picks.metrics.prepare()).decode()  # type: ignore[arg-type]
    # 9 label values (8 admitted + other) x the request series, legacy and llm_d_epp_ names alike
    assert len(text) < before + 40_000
    for i in range(300, 600):  # 300 more new names: the exposition does not grow
        picks.route(RequestInput({}, "/v1/completions", model=f"{i:04d}" + "m" * 2048, prompt="hi")).finish()
    again = generate_latest(picks.metrics.prepare()).decode()  # type: ignore[arg-type]
    assert len(again) < len(text) + 2_000
    assert 'model_name="other"' in text and 'model_name="llama"' in text
    requests = picks.metrics.sample_value
    assert requests("inference_objective_request_total",
                    {"model_name": "other", "target_model_name": "other", "priority": "0"}) == 600
    assert requests("llm_d_epp_request_total", {"model_name": "other", "target_model_name": "other",
                                                "fairness_id": "default-flow", "priority": "0"}) == 600


def test_rewrite_targets_are_known_labels() -> None:
    picks = service()
    for i in range(20):
        picks.metrics.models(f"junk{i}")  # fills the admitted set
    picks.policies = RequestPolicies.build([{
        "kind": "InferenceModelRewrite", "metadata": {"name": "r"},
        "spec": {"rules": [{"matches": [{"model": {"value": "alias"}}],
                            "targets": [{"modelRewrite": "llama-v2", "weight": 1}]}]}}], pool=None)
    routed = picks.route(RequestInput({}, "/v1/completions", model="alias", prompt="hi"))
    routed.finish()
    assert routed.request.target_model == "llama-v2"
    requests = picks.metrics.sample_value
    assert requests("inference_objective_request_total",
                    {"model_name": "alias", "target_model_name": "llama-v2", "priority": "0"}) == 1


def test_client_chosen_fairness_ids_are_bounded_too() -> None:
    picks = service()
    for i in range(300):
        picks.route(RequestInput({"x-llm-d-inference-fairness-id": f"tenant-{i}-" + "x" * 300}, "/v1/completions",
                                 model="llama", prompt="hi")).finish()
    text = generate_latest(picks.metrics.prepare()).decode()  # type: ignore[arg-type]
    ids = {line.split('fairness_id="')[1].split('"')[0] for line in text.splitlines()
           if line.startswith("llm_d_epp_request_total{")}
    assert "other" in ids and len(ids) <= 9  # 8 admitted (label_values=8) + other
