"""Strict reading of plugin parameters, with field paths in errors."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from epp.scheduling.types import ConfigError


class Params:
    """Reads typed values out of a plugin's ``parameters`` mapping; leftovers are errors."""

    def __init__(self, raw: Mapping[str, Any] | None, path: str) -> None:
        if raw is not None and not isinstance(raw, Mapping):
            raise ConfigError(path, f"expected a mapping, got {type(raw).__name__}")
        self._raw = dict(raw or {})
        self._path = path

    def int(self, key: str, default: int, minimum: int | None = None) -> int:
        v = self._raw.pop(key, default)
        if isinstance(v, bool) or not isinstance(v, int):
            raise ConfigError(f"{self._path}.{key}", f"expected an integer, got {v!r}")
        if minimum is not None and v < minimum:
            raise ConfigError(f"{self._path}.{key}", f"must be >= {minimum}, got {v}")
        return v

    def float(self, key: str, default: float, minimum: float | None = None, maximum: float | None = None) -> float:
        v = self._raw.pop(key, default)
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise ConfigError(f"{self._path}.{key}", f"expected a number, got {v!r}")
        if minimum is not None and v < minimum:
            raise ConfigError(f"{self._path}.{key}", f"must be >= {minimum}, got {v}")
        if maximum is not None and v > maximum:
            raise ConfigError(f"{self._path}.{key}", f"must be <= {maximum}, got {v}")
        return float(v)

    def bool(self, key: str, default: bool) -> bool:
        v = self._raw.pop(key, default)
        if not isinstance(v, bool):
            raise ConfigError(f"{self._path}.{key}", f"expected true or false, got {v!r}")
        return v

    def done(self) -> None:
        if self._raw:
            raise ConfigError(f"{self._path}.{sorted(self._raw)[0]}", "unknown parameter")
