"""Strict reading of plugin parameters, with field paths in errors."""

from __future__ import annotations

import builtins
import math
from collections.abc import Mapping
from typing import Any

from epp.durations import parse_duration
from epp.scheduling.types import ConfigError

INT_LIMIT = 2**31 - 1  # the default upper bound of an integer parameter
DURATION_LIMIT = 7 * 24 * 3600.0  # a week, in seconds
# Upper bounds of the parameters that size memory or work per request: a value past them is a
# typo or an attack (``lruCapacityPerServer: 1e14``), never a deployment.
# Why epp refuses the reference's in-flight load producer wherever a plugin names one.
INFLIGHT_BUILT_IN = "its in-flight counts are built in, not a producer plugin"
BLOCK_SIZE_LIMIT = 4096  # tokens per block
BLOCKS_TO_MATCH_LIMIT = 1 << 20  # blocks matched per request
BLOCKS_PER_SERVER_LIMIT = 10_000_000  # prefix-index entries per server (~1 GB)
ENDPOINTS_PER_PICK_LIMIT = 64  # primary + fallbacks


def finite(v: builtins.int | builtins.float) -> builtins.bool:
    """True for an int, or a float that is neither NaN nor infinite (1e400 parses as inf)."""
    return isinstance(v, builtins.int) or math.isfinite(v)


def show(v: Any) -> builtins.str:
    """A value for an error message, cut short (a config value can be megabytes)."""
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


class Params:
    """Reads typed values out of a plugin's ``parameters`` mapping; leftovers are errors."""

    def __init__(self, raw: Mapping[str, Any] | None, path: str) -> None:
        if raw is not None and not isinstance(raw, Mapping):
            raise ConfigError(path, f"expected a mapping, got {type(raw).__name__}")
        self._raw = dict(raw or {})
        self._path = path

    @property
    def path(self) -> str:
        return self._path

    def names(self) -> list[builtins.str]:
        """The names not read yet (for maps keyed by user data, e.g. endpoint addresses)."""
        return [k for k in self._raw if isinstance(k, str)]

    def int(self, key: str, default: int, minimum: int | None = None, maximum: int = INT_LIMIT) -> int:
        """An integer in [minimum, maximum]; every integer parameter has an upper bound."""
        v = self._raw.pop(key, default)
        if isinstance(v, bool) or not isinstance(v, int):
            raise ConfigError(f"{self._path}.{key}", f"expected an integer, got {show(v)}")
        if minimum is not None and v < minimum:
            raise ConfigError(f"{self._path}.{key}", f"must be >= {minimum}, got {v}")
        if v > maximum:
            raise ConfigError(f"{self._path}.{key}", f"must be <= {maximum}, got {show(v)}")
        return v

    def float(self, key: str, default: float, minimum: float | None = None, maximum: float | None = None) -> float:
        v = self._raw.pop(key, default)
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise ConfigError(f"{self._path}.{key}", f"expected a number, got {show(v)}")
        if not finite(v):
            raise ConfigError(f"{self._path}.{key}", f"expected a finite number, got {show(v)}")
        if minimum is not None and v < minimum:
            raise ConfigError(f"{self._path}.{key}", f"must be >= {minimum}, got {v}")
        if maximum is not None and v > maximum:
            raise ConfigError(f"{self._path}.{key}", f"must be <= {maximum}, got {v}")
        return float(v)

    def bool(self, key: str, default: bool) -> bool:
        v = self._raw.pop(key, default)
        if not isinstance(v, bool):
            raise ConfigError(f"{self._path}.{key}", f"expected true or false, got {show(v)}")
        return v

    def text(self, key: str, default: str | None = None, choices: tuple[str, ...] | None = None) -> str | None:
        v = self._raw.pop(key, default)
        if v is None:
            return None
        if not isinstance(v, str):
            raise ConfigError(f"{self._path}.{key}", f"expected a string, got {show(v)}")
        if choices is not None and v not in choices:
            raise ConfigError(f"{self._path}.{key}", f"must be one of {', '.join(choices)}, got {show(v)}")
        return v

    def duration(self, key: builtins.str, default: builtins.float) -> builtins.float:
        """A duration string ('500ms', '5s') or a number of seconds."""
        v = self._raw.pop(key, default)
        if isinstance(v, str):
            try:
                return parse_duration(v)
            except ValueError as e:
                raise ConfigError(f"{self._path}.{key}", str(e)) from None
        if isinstance(v, bool) or not isinstance(v, int | float) or not finite(v) or not 0 < v <= DURATION_LIMIT:
            raise ConfigError(f"{self._path}.{key}", f"expected a positive duration like '5s', got {show(v)}")
        return float(v)

    def optional_duration(self, key: builtins.str) -> builtins.float | None:
        """A duration as ``duration`` reads it, or None when the key is absent (no default: off)."""
        return self.duration(key, 0.0) if key in self._raw else None

    def value(self, key: builtins.str, default: Any = None) -> Any:
        """A value of any type, checked by the caller."""
        return self._raw.pop(key, default)

    def section(self, key: builtins.str) -> Params | None:
        """A nested mapping, read with the same strictness (None when absent)."""
        v = self._raw.pop(key, None)
        return None if v is None else Params(v, f"{self._path}.{key}")

    def sections(self, key: builtins.str) -> list[Params]:
        """A list of mappings, each read with the same strictness (empty when absent)."""
        v = self._raw.pop(key, None)
        if v is None:
            return []
        if not isinstance(v, list):
            raise ConfigError(f"{self._path}.{key}", f"expected a list, got {type(v).__name__}")
        return [Params(item, f"{self._path}.{key}[{i}]") for i, item in enumerate(v)]

    def str_map(self, key: builtins.str) -> dict[builtins.str, builtins.str]:
        """A mapping of strings to strings; a list of strings maps each to itself."""
        v = self._raw.pop(key, None)
        path = f"{self._path}.{key}"
        if v is None:
            return {}
        if isinstance(v, list) and all(isinstance(x, str) for x in v):
            return {x: x for x in v}
        if isinstance(v, Mapping) and all(isinstance(k, str) and isinstance(x, str) for k, x in v.items()):
            return dict(v)
        raise ConfigError(path, "expected a mapping of strings (or a list of strings)")

    def refuse(self, key: builtins.str, why: builtins.str) -> None:
        """A parameter of the reference that epp cannot honour: absent or empty passes; given, it
        is a "not supported by epp (why)" error."""
        if self._raw.pop(key, None) not in (None, ""):
            raise ConfigError(f"{self._path}.{key}", f"not supported by epp ({why})")

    def done(self) -> None:
        if self._raw:
            raise ConfigError(f"{self._path}.{sorted(self._raw)[0]}", "unknown parameter")
