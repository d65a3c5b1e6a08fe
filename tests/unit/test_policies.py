"""InferenceObjective priorities and InferenceModelRewrite rules."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import pytest

from epp.requestcontrol.policies import PolicyError, RequestPolicies, parse_policy_file


def rewrite(name: str, rules: list[dict[str, Any]], created: str = "2026-01-01T00:00:00Z",
            pool: str = "p") -> dict[str, Any]:
    return {"apiVersion": "inference.networking.x-k8s.io/v1alpha2", "kind": "InferenceModelRewrite",
            "metadata": {"name": name, "namespace": "ns", "creationTimestamp": created},
            "spec": {"poolRef": {"name": pool}, "rules": rules}}


def rule(targets: list[tuple[str, int]], *models: str) -> dict[str, Any]:
    return {"matches": [{"model": {"type": "Exact", "value": m}} for m in models],
            "targets": [{"modelRewrite": t, "weight": w} for t, w in targets]}


def objective(name: str, priority: int | None, pool: str = "p") -> dict[str, Any]:
    spec: dict[str, Any] = {"poolRef": {"name": pool}}
    if priority is not None:
        spec["priority"] = priority
    return {"kind": "InferenceObjective", "metadata": {"name": name}, "spec": spec}


def test_priorities_default_to_zero_and_other_pools_are_ignored() -> None:
    p = RequestPolicies.build([objective("batch", -5), objective("chat", None), objective("x", 9, pool="q")], "p")
    assert p.priority("batch") == -5 and p.priority("chat") == 0
    assert p.priority("x") == 0 and p.priority("unknown") == 0 and p.priority(None) == 0


def test_exact_beats_generic_then_the_oldest_object_wins() -> None:
    objs = [
        rewrite("generic", [rule([("fallback", 1)])], created="2026-01-01T00:00:00Z"),
        rewrite("newer", [rule([("v3", 1)], "food")], created="2026-03-01T00:00:00Z"),
        rewrite("older", [rule([("v1", 1)], "food"), rule([("never", 1)], "food")], created="2026-02-01T00:00:00Z"),
    ]
    p = RequestPolicies.build(objs, "p")
    rng = random.Random(1)
    assert p.rewrite("food", rng) == "v1"  # exact, oldest object, first rule
    assert p.rewrite("anything-else", rng) == "fallback"  # generic
    assert RequestPolicies.build([], "p").rewrite("food", rng) is None
    assert RequestPolicies.build([rewrite("same", [rule([("food", 1)], "food")])], "p").rewrite("food", rng) is None


def test_weights_split_traffic() -> None:
    p = RequestPolicies.build([rewrite("canary", [rule([("v1", 90), ("v2", 10)], "food")])], "p")
    rng = random.Random(7)
    seen = Counter(p.rewrite("food", rng) for _ in range(5000))
    assert set(seen) == {"v1", "v2"} and 0.08 < seen["v2"] / 5000 < 0.12


def test_bad_objects_are_skipped_or_refused_with_their_field() -> None:
    bad = rewrite("bad", [{"matches": [], "targets": [{"modelRewrite": "", "weight": 1}]}])
    p = RequestPolicies.build([bad, objective("ok", 3)], "p")
    assert p.priority("ok") == 3 and "targets[0].modelRewrite" in p.errors[0]
    with pytest.raises(PolicyError, match=r"spec\.priority"):
        RequestPolicies.build([objective("x", "high")], "p", strict=True)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"obj\.yaml: .*matches\[0\]\.model\.type: only Exact"):
        parse_policy_file("kind: InferenceModelRewrite\nmetadata: {name: r}\nspec:\n  rules:\n  - matches:\n"
                          "    - model: {type: Regex, value: x}\n    targets: [{modelRewrite: y}]\n", "obj.yaml")
    with pytest.raises(ValueError, match="document 1"):
        parse_policy_file("kind: Pod\n", "obj.yaml")
