"""epp bench seeds: configs replayed side by side over seeds, repeatably."""

from __future__ import annotations

import json
from pathlib import Path

from epp.bench.seedsweep import Sweep, first_turns, sweep_seeds
from epp.config import DEFAULT_CONFIG

RECOMMENDED = (Path(__file__).resolve().parents[2] / "epp" / "profiles" / "recommended.yaml").read_text()


def test_first_turns_are_the_routing_benchs_prompts_sharing_their_system_prompt() -> None:
    work = first_turns("zipf", 60, 30.0, seed=3)
    assert len(work.arrivals) == 60 and list(work.arrivals) == sorted(work.arrivals)
    heads = {tuple(ids[:200]) for ids in work.prompt_ids}
    assert 1 < len(heads) < 60  # Zipf groups: many requests share a system prompt
    assert all(b'"stream":true' in body for body in work.bodies)


def test_a_sweep_reports_every_config_and_repeats_exactly(tmp_path: Path) -> None:
    sweep = Sweep("zipf", 40.0, 120, "h100-llama8b", servers=4)
    configs = {"default": DEFAULT_CONFIG, "recommended": RECOMMENDED}
    first = sweep_seeds(configs, sweep, [1, 2], tmp_path / "a", processes=1)
    again = sweep_seeds(configs, sweep, [1, 2], tmp_path / "b", processes=1)
    assert [r["config"] for r in first["rows"]] == ["default", "recommended"]
    assert all(r["seeds"] == 2 and r["p90_median_s"] > 0 for r in first["rows"])
    assert [r["ttft_p90_s"] for r in first["runs"]] == [r["ttft_p90_s"] for r in again["runs"]]
    saved = json.loads((tmp_path / "a" / "seeds.json").read_text())
    assert saved["rows"] == first["rows"]
    assert "| recommended | 2 |" in (tmp_path / "a" / "seeds.md").read_text()


def test_a_gateways_path_delays_each_first_token_by_the_path(tmp_path: Path) -> None:
    configs = {"default": DEFAULT_CONFIG}
    plain = sweep_seeds(configs, Sweep("zipf", 10.0, 40, "h100-llama8b", servers=4), [1], tmp_path / "a", processes=1)
    pathed = sweep_seeds(configs, Sweep("zipf", 10.0, 40, "h100-llama8b", servers=4, path_s=0.02), [1],
                         tmp_path / "b", processes=1)
    added = pathed["runs"][0]["ttft_p50_s"] - plain["runs"][0]["ttft_p50_s"]
    assert 0.015 <= added <= 0.03  # the way to the pod and the first token's way back
    assert pathed["path_s"] == 0.02 and "path 20 ms" in (tmp_path / "b" / "seeds.md").read_text()
