"""Durations as operators write them: '50ms', '2s', '1m', '1.5s'."""

from __future__ import annotations

_UNITS = (("ms", 1e-3), ("us", 1e-6), ("s", 1.0), ("m", 60.0), ("h", 3600.0))


def parse_duration(text: str) -> float:
    """Seconds; raises ValueError naming the problem (no unit, not a number, not positive)."""
    t = text.strip().lower()
    unit = next(((suffix, scale) for suffix, scale in _UNITS if t.endswith(suffix)), None)
    if unit is None:
        raise ValueError(f"duration {text!r} needs a unit: ms, s or m (e.g. 50ms)")
    try:
        value = float(t[: -len(unit[0])]) * unit[1]
    except ValueError:
        raise ValueError(f"invalid duration {text!r}") from None
    if not value > 0 or value == float("inf"):  # also NaN ('nans') and inf ('1e400s')
        raise ValueError(f"duration must be positive and finite: {text!r}")
    return value
