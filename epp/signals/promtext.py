"""A narrow, fast reader of the Prometheus text exposition.

It looks only at the few series routing needs. Rather than walking every line in Python (a
55 KB vLLM exposition has ~1,000), it finds each wanted series with ``str.find`` (C speed) and
parses just those lines; labels are parsed only for the info metrics. Values of one name are
summed across label sets (vLLM repeats series per ``engine`` for data-parallel servers).
"""

from __future__ import annotations

import math
import re
from functools import lru_cache

from epp.datastore.endpoint import EngineSignals
from epp.signals.mappings import MetricNames, MetricSpec

_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


class ParseError(ValueError):
    pass


class ValueRejected(ParseError):
    """A routing gauge with a value no healthy server reports (NaN, infinite, negative, absurd)."""


class TooLarge(ParseError):
    """An exposition past the per-scrape limits (bytes, or series of one wanted metric)."""


MAX_SERIES = 1024  # label sets per wanted metric (vLLM has one per engine; a data-parallel pod a few)
MAX_QUEUE = 1e6  # waiting or running requests on one pod


def _split(line: str) -> tuple[str, str, float]:
    """(name, labels text, value) of a sample line."""
    brace = line.find("{")
    if brace >= 0:
        end = line.rfind("}")
        if end < brace:
            raise ParseError(f"unbalanced braces: {line[:80]!r}")
        name, labels, rest = line[:brace], line[brace + 1 : end], line[end + 1 :]
    else:
        sp = line.find(" ")
        if sp < 0:
            raise ParseError(f"no value: {line[:80]!r}")
        name, labels, rest = line[:sp], "", line[sp:]
    parts = rest.split()
    if not parts:
        raise ParseError(f"no value: {line[:80]!r}")
    return name, labels, float(parts[0])


def _labels(text: str) -> dict[str, str]:
    """Label text -> dict, cached when short: info series (cache config, LoRA) repeat the same
    labels, and a long label text must not sit in the cache."""
    return _short_labels(text) if len(text) <= 1024 else dict(_LABEL.findall(text))


@lru_cache(maxsize=256)
def _short_labels(text: str) -> dict[str, str]:
    return dict(_LABEL.findall(text))


def _lines_of(text: str, name: str, limit: int = MAX_SERIES) -> list[str]:
    """The sample lines of metric ``name`` (exact name: followed by '{' or ' '); TooLarge past
    ``limit`` of them (a dense exposition must not cost every scrape a full walk in Python)."""
    out: list[str] = []
    near = 0
    needle = "\n" + name
    n = len(text)
    start = 0 if text.startswith(name) else -1
    pos = 0
    while True:
        if start < 0:
            i = text.find(needle, pos)
            if i < 0:
                return out
            start = i + 1
        after = start + len(name)
        end = text.find("\n", after)
        if end < 0:
            end = n
        if after < n and text[after] in "{ ":
            if len(out) >= limit:
                raise TooLarge(f"more than {limit} series of {name}")
            out.append(text[start:end])
        else:
            near += 1  # a longer name that starts the same (..._waiting_by_reason): also bounded
            if near > 4 * limit:
                raise TooLarge(f"more than {4 * limit} series whose names start with {name}")
        pos = end
        start = -1


def sample_lines(text: str, name: str, limit: int = MAX_SERIES) -> list[str]:
    """The sample lines of the metric ``name`` (bounded; TooLarge past ``limit``)."""
    return _lines_of(text, name, limit)


def split_sample(line: str) -> tuple[str, dict[str, str], float]:
    """(name, labels, value) of one sample line; ParseError when it is not one."""
    try:
        name, labels, value = _split(line)
    except ValueError as e:
        raise ParseError(str(e)) from None
    return name, _labels(labels), value


def _checked(name: str, value: float, high: float) -> float:
    if not math.isfinite(value) or not 0.0 <= value <= high:
        raise ValueRejected(f"{name} = {value!r} is outside [0, {high:g}]")
    return value


def _values(lines: list[str], spec: MetricSpec) -> list[tuple[str, float]]:
    """(labels text, value) of the samples that match ``spec``'s label matchers."""
    out = []
    for line in lines:
        _, labels, value = _split(line)
        if not spec.labels or spec.matches(_labels(labels)):
            out.append((labels, value))
    return out


def parse_signals(text: str, names: MetricNames, max_series: int = MAX_SERIES) -> EngineSignals:
    """Extract routing signals from an exposition. Raises ParseError if the core gauges are
    absent, ValueRejected for a value out of range, TooLarge past ``max_series``."""
    specs = [s for s in (names.waiting, names.running, names.kv_usage, names.cache_info, names.block_size,
                         names.num_blocks, names.lora_info) if s is not None]
    lines = {s.name: _lines_of(text, s.name, max_series) for s in specs}
    waiting = _values(lines[names.waiting.name], names.waiting)
    running = _values(lines[names.running.name], names.running)
    kv = _values(lines[names.kv_usage.name], names.kv_usage) if names.kv_usage is not None else [("", 0.0)]
    missing = [str(s.name) + (f"{dict(s.labels)}" if s.labels else "")
               for s, found in ((names.waiting, waiting), (names.running, running), (names.kv_usage, kv))
               if s is not None and not found]
    if missing:
        raise ParseError(f"metrics missing: {', '.join(missing)}")
    models: list[str] = []
    for labels, _ in waiting:
        if labels:
            model = _labels(labels).get("model_name")
            if model and model not in models:
                models.append(model)
    block_size = num_blocks = None
    if names.cache_info is not None:
        for labels, _ in _values(lines[names.cache_info.name], names.cache_info):
            lab = _labels(labels)
            if lab.get(names.block_size_label, "").isdigit():
                block_size = int(lab[names.block_size_label])
            if lab.get(names.num_blocks_label, "").isdigit():
                num_blocks = int(lab[names.num_blocks_label])
    for gauge, target in ((names.block_size, "block"), (names.num_blocks, "blocks")):
        if gauge is not None:
            found = _values(lines[gauge.name], gauge)
            if found and math.isfinite(found[0][1]) and found[0][1] >= 1:
                if target == "block":
                    block_size = int(found[0][1])
                else:
                    num_blocks = int(found[0][1])
    active: frozenset[str] = frozenset()
    waiting_adapters: frozenset[str] = frozenset()
    max_adapters = 0
    if names.lora_info is not None:
        samples = _values(lines[names.lora_info.name], names.lora_info)
        if samples:  # the latest (its value is the time it was made), as the reference reads it
            lab = _labels(max(samples, key=lambda s: s[1])[0])
            active = _adapters(lab.get("running_lora_adapters", ""))
            waiting_adapters = _adapters(lab.get("waiting_lora_adapters", ""))
            if lab.get("max_lora", "").isdigit():
                max_adapters = int(lab["max_lora"])
    kv_name = names.kv_usage.name if names.kv_usage is not None else "kv usage"
    kv_usage = sum(v for _, v in kv) / len(kv)  # a fraction: average over engines
    return EngineSignals(
        waiting=_checked(names.waiting.name, sum(v for _, v in waiting), MAX_QUEUE),
        running=_checked(names.running.name, sum(v for _, v in running), MAX_QUEUE),
        kv_usage=min(_checked(kv_name, kv_usage, 1.0 + 1e-6), 1.0),
        block_size=block_size,
        num_gpu_blocks=num_blocks,
        models=tuple(models),
        active_adapters=active,
        waiting_adapters=waiting_adapters,
        max_adapters=max_adapters,
    )


def _adapters(csv: str) -> frozenset[str]:
    return frozenset(name.strip() for name in csv.split(",") if name.strip())
