"""The pool's request policies: InferenceObjective priorities and InferenceModelRewrite rules.

Both are ``llm-d.ai/v1alpha2`` custom resources (or the older
``inference.networking.x-k8s.io/v1alpha2``) that name their pool in ``spec.poolRef`` (name, group
and kind). They come from the Kubernetes API (with discovery) or from a YAML file of the same
documents (``--objectives-file``, for pools outside Kubernetes).

- InferenceObjective: the request header ``x-llm-d-inference-objective`` (or the older
  ``x-gateway-inference-objective``) names one; its
  ``spec.priority`` (unset = 0) orders requests, and a negative priority is sheddable: such
  requests get 429 while the pool is saturated.
- InferenceModelRewrite: ``spec.rules[]``, each ``matches[].model {type: Exact, value}`` (no
  matches = every model) and weighted ``targets[] {modelRewrite, weight}``. Across objects an
  exact match beats a generic rule, then the oldest object wins; within an object the first
  matching rule wins. A target is drawn at random in proportion to the weights.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("epp.policies")

GROUP = "inference.networking.x-k8s.io"
VERSION = "v1alpha2"


class PolicyError(ValueError):
    """A custom resource epp cannot use; the message names the object and field."""


@dataclass(frozen=True, slots=True)
class RewriteRule:
    exact: frozenset[str] | None  # None: a generic rule (every model)
    targets: tuple[tuple[str, int], ...]
    created: str
    name: str  # kind namespace/name, for messages and ordering
    index: int
    object_name: str = ""  # metadata.name (the rewrite-decision metrics' label)

    def draw(self, rng: random.Random) -> str:
        total = sum(w for _, w in self.targets)
        if total <= 0:
            return self.targets[0][0]
        x = rng.uniform(0, total)
        for model, weight in self.targets:
            x -= weight
            if x < 0:
                return model
        return self.targets[-1][0]


POOL_GROUP = "inference.networking.k8s.io"  # poolRef.group's default, and the InferencePool's group
POOL_KIND = "InferencePool"


def _for_pool(obj: Mapping[str, Any], pool: str, pool_group: str) -> bool:
    """Whether ``obj``'s poolRef names this pool: name, group (default inference.networking.k8s.io)
    and kind (default InferencePool) all match, as the reference checks; no poolRef: every pool."""
    ref = (obj.get("spec") or {}).get("poolRef")
    if not isinstance(ref, Mapping):
        return True
    return (ref.get("name") in (pool, None) and (ref.get("group") or POOL_GROUP) == pool_group
            and (ref.get("kind") or POOL_KIND) == POOL_KIND)


def _name(obj: Mapping[str, Any]) -> str:
    meta = obj.get("metadata") or {}
    return f"{obj.get('kind', '?')} {meta.get('namespace', '')}/{meta.get('name', '?')}".replace(" /", " ")


def parse_objective(obj: Mapping[str, Any]) -> tuple[str, int]:
    spec = obj.get("spec") or {}
    name = (obj.get("metadata") or {}).get("name")
    if not isinstance(name, str) or not name:
        raise PolicyError(f"{_name(obj)}: metadata.name: missing")
    priority = spec.get("priority", 0)
    if priority is None:
        priority = 0
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise PolicyError(f"{_name(obj)}: spec.priority: expected an integer, got {priority!r}")
    return name, priority


def parse_rewrite(obj: Mapping[str, Any]) -> list[RewriteRule]:
    spec = obj.get("spec") or {}
    meta = obj.get("metadata") or {}
    where = _name(obj)
    rules = spec.get("rules")
    if not isinstance(rules, list) or not rules:
        raise PolicyError(f"{where}: spec.rules: expected a non-empty list")
    out = []
    for i, rule in enumerate(rules):
        path = f"{where}: spec.rules[{i}]"
        if not isinstance(rule, Mapping):
            raise PolicyError(f"{path}: expected a mapping")
        matches = rule.get("matches") or []
        exact: set[str] = set()
        for j, m in enumerate(matches):
            model = m.get("model") if isinstance(m, Mapping) else None
            if not isinstance(model, Mapping) or not isinstance(model.get("value"), str):
                raise PolicyError(f"{path}.matches[{j}].model.value: expected a string")
            if model.get("type", "Exact") != "Exact":
                raise PolicyError(f"{path}.matches[{j}].model.type: only Exact is supported")
            exact.add(model["value"])
        targets = []
        for j, t in enumerate(rule.get("targets") or []):
            model = t.get("modelRewrite") if isinstance(t, Mapping) else None
            weight = t.get("weight", 1) if isinstance(t, Mapping) else None
            if not isinstance(model, str) or not model:
                raise PolicyError(f"{path}.targets[{j}].modelRewrite: expected a model name")
            if isinstance(weight, bool) or not isinstance(weight, int) or weight < 0:
                raise PolicyError(f"{path}.targets[{j}].weight: expected a non-negative integer")
            targets.append((model, weight))
        if not targets:
            raise PolicyError(f"{path}.targets: expected at least one target")
        out.append(RewriteRule(frozenset(exact) if exact else None, tuple(targets),
                               str(meta.get("creationTimestamp") or ""), where, i, str(meta.get("name") or "")))
    return out


@dataclass(slots=True)
class RequestPolicies:
    """Objectives and rewrite rules of one pool; replaced as a whole when the sources change."""

    objectives: dict[str, int] = field(default_factory=dict)
    exact: dict[str, list[RewriteRule]] = field(default_factory=dict)  # model -> rules, best first
    generic: list[RewriteRule] = field(default_factory=list)  # best first
    errors: list[str] = field(default_factory=list)

    @classmethod
    def build(cls, objects: Iterable[Mapping[str, Any]], pool: str | None, strict: bool = False,
              pool_group: str = POOL_GROUP) -> RequestPolicies:
        """From InferenceObjective / InferenceModelRewrite objects; those of other pools are
        ignored, bad ones are logged and skipped (the others still apply), or raise when strict."""
        p = cls()
        rules: list[RewriteRule] = []
        for obj in objects:
            if pool is not None and not _for_pool(obj, pool, pool_group):
                continue
            try:
                if obj.get("kind") == "InferenceObjective":
                    name, priority = parse_objective(obj)
                    p.objectives[name] = priority
                elif obj.get("kind") == "InferenceModelRewrite":
                    rules.extend(parse_rewrite(obj))
            except PolicyError as e:
                if strict:
                    raise
                p.errors.append(str(e))
                log.error("%s (skipped)", e)
        rules.sort(key=lambda r: (r.created, r.name, r.index))  # oldest object first, then rule order
        for r in rules:
            if r.exact is None:
                p.generic.append(r)
            else:
                for model in r.exact:
                    p.exact.setdefault(model, []).append(r)
        return p

    def model_names(self) -> set[str]:
        """Every model the rules name, matched or as a target."""
        rules = [r for rs in self.exact.values() for r in rs] + self.generic
        return set(self.exact) | {model for r in rules for model, _ in r.targets}

    def priority(self, objective: str | None) -> int:
        if not objective:
            return 0
        return self.objectives.get(objective, 0)

    def rewrite(self, model: str, rng: random.Random) -> str | None:
        """The model to send instead of ``model``, or None to leave it alone."""
        found = self.rewrite_by(model, rng)
        return found[1] if found is not None else None

    def rewrite_by(self, model: str, rng: random.Random) -> tuple[str, str] | None:
        """(the InferenceModelRewrite's name, the model to send) for ``model``, or None."""
        rules = self.exact.get(model) or self.generic
        if not rules:
            return None
        target = rules[0].draw(rng)
        return None if target == model else (rules[0].object_name, target)


def parse_policy_file(text: str, source: str) -> RequestPolicies:
    """A YAML stream of InferenceObjective / InferenceModelRewrite documents. Raises ValueError
    (with the file and the object's field) so a bad edit keeps the previous policies."""
    import yaml

    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as e:
        raise ValueError(f"{source}: not YAML: {e}") from None
    for i, d in enumerate(docs):
        if not isinstance(d, Mapping) or d.get("kind") not in ("InferenceObjective", "InferenceModelRewrite"):
            raise ValueError(f"{source}: document {i + 1}: expected kind InferenceObjective or InferenceModelRewrite")
    try:
        return RequestPolicies.build(docs, pool=None, strict=True)
    except PolicyError as e:
        raise ValueError(f"{source}: {e}") from None
