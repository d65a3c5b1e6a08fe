"""A narrow, fast reader of the Prometheus text exposition.

It looks only at the few series routing needs. Rather than walking every line in Python (a
55 KB vLLM exposition has ~1,000), it cuts the text once at its ``# TYPE`` lines (one C-speed
split) and reads each wanted series from its own family; a series no ``# TYPE`` line declares is
found with ``str.find`` over the whole text (each such search costs a full pass, so the split
comes first). Labels are parsed only for the info metrics. Values of one name are summed across
label sets (vLLM repeats series per ``engine`` for data-parallel servers).
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


_TYPE_LINE = "\n# TYPE "


def families(text: str) -> dict[str, str | None]:
    """Each declared metric family's part of ``text``: from its ``# TYPE`` line (without the
    ``# TYPE `` itself) to the next one; None for a family declared more than once (not well
    formed: its samples are searched for in the whole text). Empty when nothing is declared."""
    parts = text.split(_TYPE_LINE)
    if text.startswith("# TYPE "):
        parts[0] = parts[0][7:]
    elif len(parts) == 1:
        return {}
    else:
        del parts[0]  # what comes before the first declaration
    out: dict[str, str | None] = {part.partition(" ")[0]: part for part in parts}
    if len(out) < len(parts):  # a family declared twice
        seen: set[str] = set()
        for part in parts:
            name = part.partition(" ")[0]
            if name in seen:
                out[name] = None
            seen.add(name)
    return out


def series_lines(text: str, declared: dict[str, str | None], name: str, limit: int = MAX_SERIES) -> list[str]:
    """The sample lines of ``name``: from its family when ``declared`` has it and holds samples of
    it (a well-formed exposition groups a family's lines), else from the whole text."""
    part = declared.get(name)
    if part is not None:
        first = part.find("\n")
        if first >= 0:
            lines = _lines_of(part, name, limit, first)
            if lines:
                return lines
    return _lines_of(text, name, limit)


def _lines_of(text: str, name: str, limit: int = MAX_SERIES, pos: int = 0) -> list[str]:
    """The sample lines of metric ``name`` (exact name: followed by '{' or ' ') from ``pos`` on;
    TooLarge past ``limit`` of them (a dense exposition must not cost every scrape a full walk in
    Python)."""
    out: list[str] = []
    near = 0
    needle = "\n" + name
    n = len(text)
    start = 0 if pos == 0 and text.startswith(name) else -1
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


_NEAR = 512  # bytes: how far a family may move between two expositions and still be found near its place


class LayoutMemo:
    """Where one endpoint's wanted series were in its last exposition read in full.

    An endpoint sends the same families in the same order every time; only numbers change. So the
    next exposition looks for each wanted family's ``# TYPE`` line near its last place instead of
    cutting the whole text, and an optional series it lacked stays lacking. Every ``recheck``-th
    exposition is read in full, and so is one where a family is not near its place: a series no
    ``# TYPE`` line declares, or a family declared twice, is seen at most ``recheck`` scrapes late."""

    __slots__ = ("absent", "left", "places", "recheck")

    def __init__(self, recheck: int = 20) -> None:
        self.recheck = recheck
        self.places: dict[str, int] = {}  # name -> offset of its "# TYPE" line
        self.absent: frozenset[str] = frozenset()
        self.left = 0  # expositions to read from the places before the next full read

    def lines(self, text: str, names: list[str], limit: int) -> dict[str, list[str]] | None:
        """Each name's sample lines, read near their places; None when a full read is due."""
        if self.left <= 0:
            return None
        out: dict[str, list[str]] = {}
        for name in names:
            if name in self.absent:
                out[name] = []
                continue
            at = self.places.get(name)
            if at is None:  # found outside its family last time: only a full read finds it
                return None
            needle = "# TYPE " + name + " "
            if not (text.startswith(needle, at) and (at == 0 or text[at - 1] == "\n")):
                at = text.find("\n" + needle, max(0, at - _NEAR), at + _NEAR + len(needle))
                if at < 0:
                    return None
                at += 1
            end = text.find(_TYPE_LINE, at)
            part = text[at + 7 : end if end >= 0 else len(text)]
            first = part.find("\n")
            found = _lines_of(part, name, limit, first) if first >= 0 else []
            if not found:
                return None
            self.places[name] = at
            out[name] = found
        self.left -= 1
        return out

    def learn(self, text: str, declared: dict[str, str | None], lines: dict[str, list[str]]) -> None:
        """After a full read: where each series read from its own family is, what was lacking."""
        places = {}
        for name, found in lines.items():
            if found and declared.get(name) is not None:
                at = 0 if text.startswith("# TYPE " + name + " ") else text.find("\n# TYPE " + name + " ") + 1
                if at > 0 or text.startswith("# TYPE "):
                    places[name] = at
        self.places = places
        self.absent = frozenset(name for name, found in lines.items() if not found)
        self.left = self.recheck


def wanted_lines(text: str, names: list[str], limit: int = MAX_SERIES,
                 memo: LayoutMemo | None = None) -> dict[str, list[str]]:
    """The sample lines of each of ``names``: near their places when ``memo`` knows them, else
    from a full read (which ``memo`` then remembers)."""
    if memo is not None:
        near = memo.lines(text, names, limit)
        if near is not None:
            return near
    declared = families(text)
    lines = {name: series_lines(text, declared, name, limit) for name in names}
    if memo is not None:
        memo.learn(text, declared, lines)
    return lines


def parse_signals(text: str, names: MetricNames, max_series: int = MAX_SERIES,
                  memo: LayoutMemo | None = None) -> EngineSignals:
    """Extract routing signals from an exposition. Raises ParseError if the core gauges are
    absent, ValueRejected for a value out of range, TooLarge past ``max_series``. ``memo`` (one
    per endpoint) remembers where its series are, so most expositions are not read in full."""
    specs = [s for s in (names.waiting, names.running, names.kv_usage, names.cache_info, names.block_size,
                         names.num_blocks, names.lora_info) if s is not None]
    lines = wanted_lines(text, [s.name for s in specs], max_series, memo)
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
