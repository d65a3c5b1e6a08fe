"""``epp tune``: search weights and parameters for the config that serves a recorded trace best.

Each candidate config replays the trace (epp.tuning.replay) on engines made from the recorded
pool's cache config and the speed the trace's responses show, for a few seeds (tie-breaking
draws), and is scored on the objective (TTFT p90 by default; a candidate that refuses or loses
more requests than the current config never wins). The search is coordinate descent from the
current config over the axes (every scorer's weight in the main profile, by default, plus the
``--axis`` given), or the full grid of the axes; the winner is replayed on more seeds, next to the
current config, and kept only if it still wins. Replays run in worker processes, one per core.

Output: ``tune.json`` (every candidate's numbers), ``tune.md`` (best vs current), the best config
(``best-config.yaml``, the current config with the winning values) and ``tune.png`` (TTFT CDFs of
both, and the objective of each candidate tried).
"""

from __future__ import annotations

import copy
import itertools
import json
import multiprocessing
import os
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from epp.config import DEFAULT_CONFIG, parse_config
from epp.sim.profiles import EngineParams, profile
from epp.tuning.replay import ReplayError, ReplayOptions, Workload, check_replayable, run_replay
from epp.tuning.trace import RecordedTrace, SpeedFit, load_trace, measure_speed

OBJECTIVES = {"p50": "ttft_p50_s", "p90": "ttft_p90_s", "p99": "ttft_p99_s", "mean": "ttft_mean_s"}
DEFAULT_WEIGHTS = (0, 1, 2, 3, 5, 8)
MAX_GRID = 400
BETTER_BY = 0.01  # a candidate must beat the best so far by 1% to replace it (replays are not free of noise)


class TuneError(ValueError):
    """The search cannot run (the message says why)."""


@dataclass(frozen=True, slots=True)
class Axis:
    """One thing to vary: a scorer's weight in the main profile, or a plugin's parameter."""

    ref: str
    param: str  # "weight" for the weight
    values: tuple[Any, ...]

    @property
    def label(self) -> str:
        return f"{self.ref}.{self.param}"


def parse_axis(spec: str) -> Axis:
    """``REF.weight=0,1,3`` or ``REF.PARAM=V1,V2`` (values read as YAML scalars)."""
    target, eq, raw = spec.partition("=")
    ref, dot, param = target.strip().rpartition(".")
    if not eq or not dot or not ref or not param or not raw.strip():
        raise TuneError(f"--axis {spec!r}: expected PLUGIN.weight=V1,V2,... or PLUGIN.PARAMETER=V1,V2,...")
    values = tuple(yaml.safe_load(v.strip()) for v in raw.split(","))
    if param == "weight" and not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0
                                     for v in values):
        raise TuneError(f"--axis {spec!r}: weights are numbers >= 0")
    return Axis(ref, param, values)


Assignment = tuple[tuple[str, Any], ...]  # (axis label, value) per axis, in axis order


def _plugin_entry(doc: dict[str, Any], ref: str) -> dict[str, Any] | None:
    for entry in doc.get("plugins") or []:
        if isinstance(entry, dict) and (entry.get("name") or entry.get("type")) == ref:
            return entry
    return None


def _profile_entry(doc: dict[str, Any], profile_name: str, ref: str) -> dict[str, Any] | None:
    for prof in doc.get("schedulingProfiles") or []:
        if isinstance(prof, dict) and prof.get("name") == profile_name:
            for entry in prof.get("plugins") or []:
                if isinstance(entry, dict) and entry.get("pluginRef") == ref:
                    return entry
    return None


@dataclass(slots=True)
class ConfigSpace:
    """The current config and the axes; ``render`` writes the config for one assignment."""

    text: str
    source: str
    axes: list[Axis]
    doc: dict[str, Any] = field(init=False)
    profile_name: str = field(init=False)
    current: Assignment = field(init=False)

    def __post_init__(self) -> None:
        cfg = parse_config(self.text, self.source)
        check_replayable(cfg)
        loaded = yaml.safe_load(self.text)
        if not isinstance(loaded, dict):
            raise TuneError(f"{self.source}: expected a config document")
        self.doc, self.profile_name = loaded, cfg.profile_name
        weights = dict(cfg.scorer_refs)
        if not self.axes:
            if not weights:
                raise TuneError(f"{self.source}: the main profile has no scorer to weigh; give --axis")
            self.axes = [Axis(ref, "weight", tuple(sorted({*DEFAULT_WEIGHTS, _num(w)}))) for ref, w in weights.items()]
        current: list[tuple[str, Any]] = []
        for axis in self.axes:
            if axis.param == "weight":
                if axis.ref not in weights:
                    raise TuneError(f"--axis {axis.label}: {axis.ref} is not a scorer of the profile "
                                    f"{self.profile_name!r} (scorers: {', '.join(weights) or 'none'})")
                current.append((axis.label, _num(weights[axis.ref])))
            else:
                entry = _plugin_entry(self.doc, axis.ref)
                if entry is None:
                    raise TuneError(f"--axis {axis.label}: no plugin named {axis.ref!r} in {self.source}")
                current.append((axis.label, (entry.get("parameters") or {}).get(axis.param)))
        self.current = tuple(current)
        for axis in self.axes:  # every value must make a valid config: fail now, not in the middle
            for v in axis.values:
                self.render(self._with(self.current, axis.label, v))

    def _with(self, a: Assignment, label: str, value: Any) -> Assignment:
        return tuple((k, value if k == label else v) for k, v in a)

    def neighbours(self, a: Assignment, axis: Axis) -> list[Assignment]:
        return [self._with(a, axis.label, v) for v in axis.values]

    def grid(self) -> list[Assignment]:
        combos = list(itertools.product(*(axis.values for axis in self.axes)))
        if len(combos) > MAX_GRID:
            raise TuneError(f"the grid has {len(combos)} configs (more than {MAX_GRID}): use --search descent "
                            "or fewer values")
        return [tuple((axis.label, v) for axis, v in zip(self.axes, combo, strict=True)) for combo in combos]

    def render(self, a: Assignment) -> str:
        doc = copy.deepcopy(self.doc)
        by_label = dict(a)
        for axis in self.axes:
            value = by_label[axis.label]
            if axis.param == "weight":
                entry = _profile_entry(doc, self.profile_name, axis.ref)
                if entry is None:  # a profile written without the entry's weight in the doc's form
                    raise TuneError(f"{self.source}: no entry for {axis.ref} in profile {self.profile_name!r}")
                entry["weight"] = value
            else:
                entry = _plugin_entry(doc, axis.ref)
                assert entry is not None
                params = entry.setdefault("parameters", {})
                if value is None:
                    params.pop(axis.param, None)
                else:
                    params[axis.param] = value
        text: str = yaml.safe_dump(doc, sort_keys=False)
        try:
            parse_config(text, f"{self.source} with {describe(a)}")
        except ValueError as e:
            raise TuneError(str(e)) from None
        return text


def _num(w: float) -> int | float:
    return int(w) if float(w).is_integer() else w


def describe(a: Assignment) -> str:
    return ", ".join(f"{k}={'(unset)' if v is None else v}" for k, v in a)


# -- the engines ---------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Fleet:
    addresses: list[str]
    engines: list[EngineParams]
    speeds: dict[str, SpeedFit]  # what each endpoint's own responses showed ("*": the whole pool)
    notes: list[str]


def fleet_from_trace(trace: RecordedTrace, base: EngineParams, servers: int | None = None,
                     measured: bool = True) -> Fleet:
    """One engine per recorded endpoint: ``base`` with the endpoint's block size and blocks, and
    the speed the trace shows for it (its own responses when there are enough, else the pool's)."""
    notes: list[str] = []
    members = trace.pool
    if servers is not None:
        addresses = [m.address for m in members[:servers]] + [f"10.0.0.{i + 1}:8000"
                                                              for i in range(len(members), servers)]
    elif members:
        addresses = [m.address for m in members]
    else:
        addresses = sorted({r.endpoint for r in trace.requests if r.endpoint})
        notes.append("the trace has no pool header: one engine per endpoint that served a request")
    if not addresses:
        raise TuneError(f"{trace.path}: no endpoint to replay on; give --servers")
    pool_speed = measure_speed(trace.requests) if measured else SpeedFit(None, None, None, 0)
    speeds = {"*": pool_speed}
    if measured and pool_speed.prefill_per_token_s is None:
        notes.append(f"too few streamed responses with usage to measure the speed ({pool_speed.samples}): "
                     "the engine preset's speed is used")
    by_address = {m.address: m for m in members}
    engines = []
    for a in addresses:
        p = base
        m = by_address.get(a)
        if m is not None and m.block_size:
            p = p.with_overrides(block_size=m.block_size)
        if m is not None and m.num_gpu_blocks:
            p = p.with_overrides(num_gpu_blocks=m.num_gpu_blocks)
        if measured:
            own = measure_speed([r for r in trace.requests if r.endpoint == a])
            speed = own if _differs(own, pool_speed) else pool_speed
            speeds[a] = speed
            p = speed.applied(p)
        engines.append(p)
    return Fleet(addresses, engines, speeds, notes)


SAME_SPEED = 0.25  # an endpoint's own fit is used when it is this much off the pool's (another GPU)


def _differs(own: SpeedFit, pool: SpeedFit) -> bool:
    """Whether an endpoint's own responses show a clearly different speed from the pool's (a
    different GPU generation) rather than the noise of fewer samples."""
    pairs = ((own.prefill_per_token_s, pool.prefill_per_token_s), (own.decode_step_s, pool.decode_step_s))
    return any(o is not None and p is not None and abs(o / p - 1) > SAME_SPEED for o, p in pairs) or (
        own.prefill_per_token_s is not None and pool.prefill_per_token_s is None)


# -- the search ------------------------------------------------------------------------------------------
_WORK: dict[str, Any] = {}  # a worker process's replay inputs (set once by its initializer)


def _init_worker(trace_path: str, fleet: Fleet, opts: ReplayOptions) -> None:
    _WORK.update(work=Workload.from_trace(load_trace(Path(trace_path))), fleet=fleet, opts=opts)


def _evaluate(text: str, name: str, seed: int) -> dict[str, Any]:
    fleet: Fleet = _WORK["fleet"]
    base: ReplayOptions = _WORK["opts"]
    opts = ReplayOptions(base.refresh_s, base.staleness_s, seed)
    r = run_replay(text, name, _WORK["work"], fleet.engines, opts, fleet.addresses)
    return r.summary() | {"ttft_all_s": sorted(round(x, 4) for x in r.ttft_s)}


def _result(job: Future[dict[str, Any]], label: str) -> dict[str, Any]:
    """A replay's summary; a replay that failed (a plugin's error) is a TuneError naming the config."""
    try:
        return job.result()
    except (TuneError, ReplayError):
        raise
    except Exception as e:
        raise TuneError(f"the replay of {label} failed: {type(e).__name__}: {e}") from None


@dataclass(slots=True)
class TuneOptions:
    objective: str = "p90"
    search: str = "descent"  # or "grid"
    rounds: int = 2  # descent: passes over the axes
    seeds: int = 2  # replays per candidate (tie-breaking draws), scores averaged
    confirm_seeds: int = 4  # more replays of the best and the current before the best is kept
    workers: int = 0  # 0: one per core available
    replay: ReplayOptions = field(default_factory=ReplayOptions)


@dataclass(slots=True)
class Candidate:
    """One config replayed: its label (the assignment, or a candidate file's name), its text and runs."""

    label: str
    text: str
    runs: list[dict[str, Any]]

    def mean(self, key: str) -> float:
        vals = [float(r[key]) for r in self.runs if r[key] is not None]
        return sum(vals) / len(vals) if vals else float("inf")

    def lost(self) -> float:
        return float(sum(sum(r["refused"].values()) + r["failed"] for r in self.runs)) / len(self.runs)

    def row(self, objective_key: str) -> dict[str, Any]:
        keys = ("ttft_p50_s", "ttft_p90_s", "ttft_p99_s", "ttft_mean_s", "e2e_p90_s", "prefix_hit_rate",
                "load_imbalance")
        return {"config": self.label, **{k: round(self.mean(k), 4) for k in keys},
                "lost": self.lost(), "objective": round(self.mean(objective_key), 4), "seeds": len(self.runs)}


class Search:
    def __init__(self, space: ConfigSpace, opts: TuneOptions, pool: ProcessPoolExecutor,
                 progress: Callable[[str], None], others: Sequence[tuple[str, str]] = ()) -> None:
        self.space, self.opts, self.pool, self.progress = space, opts, pool, progress
        self.others = others  # whole configs to compare too: (label, text)
        self.key = OBJECTIVES[opts.objective]
        self.tried: dict[str, Candidate] = {}

    def evaluate(self, configs: Iterable[tuple[str, str]]) -> list[Candidate]:
        configs = list(configs)
        todo = [(label, text) for label, text in dict(configs).items() if label not in self.tried]
        jobs = {(label, s): self.pool.submit(_evaluate, text, label, s + 1)
                for label, text in todo for s in range(self.opts.seeds)}
        for label, text in todo:
            c = self.tried[label] = Candidate(label, text, [_result(jobs[(label, s)], label)
                                                            for s in range(self.opts.seeds)])
            self.progress(f"{label}: {self.opts.objective} {c.mean(self.key):.4f} s"
                          + (f", {c.lost():g} lost" if c.lost() else ""))
        return [self.tried[label] for label, _ in configs]

    def assignments(self, assignments: Iterable[Assignment]) -> list[Candidate]:
        return self.evaluate((describe(a), self.space.render(a)) for a in assignments)

    def confirm(self, current: Candidate, best: Candidate) -> Candidate:
        """Replay the two on ``confirm_seeds`` more seeds each: the best stays only if it still wins
        on all its seeds together (a search over many candidates favours a lucky draw)."""
        more = range(self.opts.seeds, self.opts.seeds + self.opts.confirm_seeds)
        jobs = {(c.label, s): self.pool.submit(_evaluate, c.text, c.label, s + 1)
                for c in (current, best) for s in more}
        for c in (current, best):
            c.runs += [_result(jobs[(c.label, s)], c.label) for s in more]
        kept = best if self.better(best, current) else current
        self.progress(f"confirmed on {len(best.runs)} seeds: {best.label} {best.mean(self.key):.4f} s vs the current "
                      f"{current.mean(self.key):.4f} s: "
                      + ("kept" if kept is best else "not better: the current config stays"))
        return kept

    def better(self, c: Candidate, best: Candidate) -> bool:
        if c.lost() != best.lost():
            return c.lost() < best.lost()
        return c.mean(self.key) < best.mean(self.key) * (1 - BETTER_BY)

    def run(self) -> tuple[Candidate, Candidate]:
        """(current, best)."""
        current = self.assignments([self.space.current])[0]
        best = current
        if self.opts.search == "grid":
            for c in self.assignments(self.space.grid()):
                if self.better(c, best):
                    best = c
        else:
            best_assignment = self.space.current
            for _ in range(self.opts.rounds):
                start = best
                for axis in self.space.axes:
                    neighbours = self.space.neighbours(best_assignment, axis)
                    for a, c in zip(neighbours, self.assignments(neighbours), strict=True):
                        if self.better(c, best):
                            best, best_assignment = c, a
                if best is start:
                    break
        for c in self.evaluate(self.others):
            if self.better(c, best):
                best = c
        if best is not current and self.opts.confirm_seeds:
            best = self.confirm(current, best)
        return current, best


def tune(trace_path: Path, out: Path, config_text: str = DEFAULT_CONFIG, config_source: str = "<default config>",
         axes: Sequence[Axis] = (), opts: TuneOptions | None = None, engine: str = "h100-llama8b",
         servers: int | None = None, measured_speed: bool = True,
         progress: Callable[[str], None] = lambda _m: None,
         candidates: Sequence[tuple[str, str]] = ()) -> dict[str, Any]:
    """Search from the current config (``config_text``) and compare the whole ``candidates``
    configs ((name, text) each) too; write the report and the best config into ``out``."""
    opts = opts or TuneOptions()
    if opts.objective not in OBJECTIVES:
        raise TuneError(f"--objective {opts.objective!r}: one of {', '.join(OBJECTIVES)}")
    trace = load_trace(trace_path)
    space = ConfigSpace(config_text, config_source, list(axes))
    for name, text in candidates:  # refused now, not after the search
        check_replayable(parse_config(text, name))
    fleet = fleet_from_trace(trace, profile(engine), servers, measured_speed)
    for note in fleet.notes:
        progress(note)
    warnings = knee_warnings(opts.objective, trace.first_seen_share())
    for w in warnings:
        progress(f"warning: {w}")
    workers = opts.workers or max(1, min(len(os.sched_getaffinity(0)), 8))
    started = time.monotonic()
    progress(f"{len(trace.requests)} requests over {trace.seconds:.0f} s on {len(fleet.engines)} engines; "
             f"{workers} worker processes")
    # (spawned, not forked: the caller may run an event loop and threads, which a fork would copy)
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker,
                             initargs=(str(trace_path), fleet, opts.replay)) as pool:
        search = Search(space, opts, pool, progress, candidates)
        current, best = search.run()
    out.mkdir(parents=True, exist_ok=True)
    key = OBJECTIVES[opts.objective]
    best_text = best.text
    header = (f"# epp tune: the best of {len(search.tried)} configs for {trace_path.name} "
              f"(objective TTFT {opts.objective}, predicted {best.mean(key):.4f} s vs {current.mean(key):.4f} s "
              f"for {config_source})\n")
    (out / "best-config.yaml").write_text(header + best_text)
    result = {
        "meta": {"date": time.strftime("%Y-%m-%d %H:%M"), "trace": str(trace_path), "requests": len(trace.requests),
                 "trace_seconds": round(trace.seconds, 2), "config": config_source, "objective": opts.objective,
                 "search": opts.search, "seeds": opts.seeds, "confirm_seeds": opts.confirm_seeds,
                 "axes": [[a.label, list(a.values)] for a in space.axes],
                 "engine": engine, "engines": [_engine_row(a, p) for a, p in zip(fleet.addresses, fleet.engines,
                                                                                  strict=True)],
                 "speed": {a: _speed_row(s) for a, s in fleet.speeds.items()}, "notes": fleet.notes + warnings,
                 "first_seen_share": round(trace.first_seen_share(), 4),
                 "wall_s": round(time.monotonic() - started, 1), "replays": len(search.tried) * opts.seeds},
        "current": current.row(key), "best": best.row(key),
        "tried": sorted((c.row(key) for c in search.tried.values()), key=lambda r: (r["lost"], r["objective"])),
    }
    (out / "tune.json").write_text(json.dumps(result, indent=1))
    (out / "tune.md").write_text(markdown(result))
    plot(out, current, best, list(search.tried.values()), key)
    return result


KNEE = 0.04  # an objective percentile this close to the compulsory-miss share sits on the CDF's knee
PERCENTILES = {"p50": 0.50, "p90": 0.90, "p99": 0.99}


def knee_warnings(objective: str, first_seen: float) -> list[str]:
    """A percentile near the trace's share of compulsory misses measures which requests are cold,
    not how fast the warm ones are: one more or one fewer cold request moves it a lot."""
    q = PERCENTILES.get(objective)
    if q is None or abs((1 - q) - first_seen) >= KNEE:
        return []
    return [f"TTFT {objective} sits at the trace's compulsory misses ({first_seen:.1%} of its requests carry a "
            f"prompt no earlier one did): a config that makes one more or one fewer request cold moves it a lot, "
            f"and that does not carry over to other traffic. Record a longer trace (the share falls as prompts "
            f"repeat) or tune another objective."]


def _engine_row(address: str, p: EngineParams) -> dict[str, Any]:
    return {"address": address, "block_size": p.block_size, "num_gpu_blocks": p.num_gpu_blocks,
            "prefill_per_token_us": round(p.prefill_per_token_s * 1e6, 2),
            "prefill_overhead_ms": round(p.prefill_overhead_s * 1e3, 2),
            "decode_base_ms": round(p.decode_base_s * 1e3, 2), "decode_per_seq_us": round(p.decode_per_seq_s * 1e6, 1)}


def _speed_row(s: SpeedFit) -> dict[str, Any]:
    return {"prefill_per_token_us": None if s.prefill_per_token_s is None else round(s.prefill_per_token_s * 1e6, 2),
            "first_token_overhead_ms": None if s.first_token_overhead_s is None
            else round(s.first_token_overhead_s * 1e3, 2),
            "decode_step_ms": None if s.decode_step_s is None else round(s.decode_step_s * 1e3, 2),
            "samples": s.samples}


def markdown(result: dict[str, Any]) -> str:
    m = result["meta"]
    cols = ("ttft_p50_s", "ttft_p90_s", "ttft_p99_s", "prefix_hit_rate", "load_imbalance", "lost")
    lines = [f"# epp tune: {m['trace']}", "",
             f"{m['requests']} requests over {m['trace_seconds']} s, {len(m['engines'])} engines ({m['engine']} with "
             f"the trace's cache config and speed), objective TTFT {m['objective']}, {m['search']} search, "
             f"{m['seeds']} seeds per config, {m['replays']} replays in {m['wall_s']} s.", "",
             "| | config | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for label in ("current", "best"):
        r = result[label]
        lines.append(f"| {label} | {r['config']} | " + " | ".join(str(r[c]) for c in cols) + " |")
    lines += ["", "Every config tried, best first:", "", "| config | " + " | ".join(cols) + " |",
              "|---|" + "---|" * len(cols)]
    lines += ["| " + r["config"] + " | " + " | ".join(str(r[c]) for c in cols) + " |" for r in result["tried"]]
    if m["notes"]:
        lines += ["", *(f"- {n}" for n in m["notes"])]
    return "\n".join(lines) + "\n"


def plot(out: Path, current: Candidate, best: Candidate, tried: list[Candidate], key: str) -> None:
    try:
        import matplotlib
    except ImportError:  # (plots are optional: the bench extra)
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (cdf, bars) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [1, 1.3]})
    top = 0.0
    for label, c in (("current", current), ("best", best)):
        xs = c.runs[0]["ttft_all_s"]
        if xs:
            cdf.plot(xs, [(i + 1) / len(xs) for i in range(len(xs))], label=label)
            top = max(top, xs[min(len(xs) - 1, int(len(xs) * 0.995))])
    if top:
        cdf.set_xlim(0, top)
    cdf.set_xlabel("predicted TTFT (s)")
    cdf.set_ylabel("fraction of requests")
    cdf.legend(loc="lower right")
    cdf.set_title("TTFT CDF (first seed)", fontsize=10)
    fig.text(0.01, 0.01, f"current: {current.label}\nbest: {best.label}", fontsize=7)
    ranked = sorted(tried, key=lambda c: c.mean(key))
    bars.barh(range(len(ranked)), [c.mean(key) for c in ranked],
              color=["tab:green" if c is best else "tab:orange" if c is current else "tab:gray" for c in ranked])
    bars.set_yticks(range(len(ranked)), [f"{c.label} ({len(c.runs)} seeds)" for c in ranked],
                    fontsize=5)
    bars.invert_yaxis()
    bars.set_xlabel(f"{key} (s), mean over seeds")
    bars.set_title("every config tried (green: best, orange: current)", fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(out / "tune.png", dpi=100)
    plt.close(fig)
