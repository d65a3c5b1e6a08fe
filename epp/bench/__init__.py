"""Benchmarks: `epp bench overhead` (picker cost) and `epp bench sim` (simulator queueing/prefix)."""
