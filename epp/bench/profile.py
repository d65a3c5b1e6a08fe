"""Summarise a py-spy raw (collapsed stacks) profile: top functions by self and total samples."""

from __future__ import annotations

from collections import Counter
from pathlib import Path


def top_functions(path: Path, n: int = 15) -> str:
    self_counts: Counter[str] = Counter()
    total_counts: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = stack.split(";")
        self_counts[frames[-1]] += count
        for f in set(frames):
            total_counts[f] += count
    if not total:
        return "profile: no samples"
    lines = [f"py-spy: {total} samples", "", "| self % | function |", "|---|---|"]
    lines += [f"| {c / total * 100:.1f} | {f} |" for f, c in self_counts.most_common(n)]
    lines += ["", "| total % | function |", "|---|---|"]
    lines += [f"| {c / total * 100:.1f} | {f} |" for f, c in total_counts.most_common(n)]
    return "\n".join(lines)
