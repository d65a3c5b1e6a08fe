"""Plugin types by config name: epp's own, and those other packages install.

A package adds plugin types through the ``epp.plugins`` entry-point group, one entry per type,
named by the type's config name and pointing at its class::

    [project.entry-points."epp.plugins"]
    preferred-port-scorer = "my_epp_plugins:PreferredPortScorer"

Installed types are listed when a config is parsed and imported only when a config uses them.
Registering checks the contract (``epp.scheduling.contract``): one role, each declared hook
implemented with its declared parameters, no hook-named method that is not declared. A broken
plugin is a ConfigError naming the config entry, never a traceback.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from importlib import metadata
from typing import Any

from epp.flowcontrol import contract as flow_contract
from epp.scheduling import contract as scheduling_contract
from epp.scheduling.contract import HOOKS
from epp.scheduling.params import show
from epp.scheduling.types import ConfigError

ENTRY_POINT_GROUP = "epp.plugins"
# Every role a plugin may have: the scheduling ones and the flow-control ones.
ROLES = scheduling_contract.ROLES + flow_contract.ROLES
ROLE_METHODS = {**scheduling_contract.ROLE_METHODS, **flow_contract.ROLE_METHODS}


class ContractError(Exception):
    """A plugin class that does not follow the contract."""


@dataclass(frozen=True, slots=True)
class PluginType:
    type_name: str
    cls: type[Any]
    role: str  # as ROLES names it: "filter", "scorer", "picker", ..., "saturation detector", ...
    origin: str  # "epp", or the distribution that installed it


def _own_function(cls: type[Any], method: str, protocol: type[Any]) -> Any:
    """The class's implementation of ``method``, or None if it is the protocol's stub."""
    for klass in cls.__mro__:
        if method in klass.__dict__:
            return None if klass is protocol else klass.__dict__[method]
    return None


def _arity(fn: Any) -> int:
    params = list(inspect.signature(fn).parameters.values())
    return sum(1 for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))


def check_contract(cls: type[Any], origin: str = "epp") -> PluginType:
    """Validate ``cls`` as a plugin type; raises ContractError saying what is wrong."""
    type_name = cls.__dict__.get("type_name")
    if not isinstance(type_name, str) or not type_name:
        raise ContractError(f"{cls.__qualname__} has no type_name")
    roles = [(proto, role) for proto, role in ROLES if proto in cls.__mro__]
    if len(roles) != 1:
        names = ", ".join(proto.__name__ for proto, _ in ROLES)
        raise ContractError(f"{type_name}: a plugin subclasses exactly one of {names} (found {len(roles)})")
    role_proto, role = roles[0]
    checks: list[tuple[type[Any], str]] = [(role_proto, m) for m in ROLE_METHODS[role_proto]]
    declared_methods: set[str] = set()
    for hook, methods in HOOKS:
        if hook in cls.__mro__:
            checks.extend((hook, m) for m in methods)
            declared_methods.update(methods)
    for proto, method in checks:
        impl = _own_function(cls, method, proto)
        if impl is None:
            raise ContractError(f"{type_name}: declares {proto.__name__} but does not implement {method}()")
        expected = _arity(proto.__dict__[method])
        if callable(impl) and _arity(impl) != expected:
            raise ContractError(f"{type_name}: {method}() takes {_arity(impl)} positional parameters, "
                                f"{proto.__name__} says {expected}")
    for hook, methods in HOOKS:
        for method in methods:
            if method not in declared_methods and callable(getattr(cls, method, None)):
                raise ContractError(f"{type_name}: defines {method}() without declaring {hook.__name__}, "
                                    "so it would never be called")
    try:
        init = inspect.signature(cls)
        init.bind("name", object())
    except (TypeError, ValueError):
        raise ContractError(f"{type_name}: must be constructible as {cls.__name__}(name, params)") from None
    return PluginType(type_name, cls, role, origin)


class PluginRegistry:
    """Type name -> plugin type. Built-in types are registered eagerly; installed ones on use."""

    def __init__(self, builtin: Iterable[type[Any]], installed: Mapping[str, metadata.EntryPoint] | None = None
                 ) -> None:
        self._types: dict[str, PluginType] = {}
        for cls in builtin:
            t = check_contract(cls)
            self._types[t.type_name] = t
        self._installed = {k: v for k, v in (installed or {}).items() if k not in self._types}
        self.shadowed = sorted(k for k in (installed or {}) if k in self._types)

    @classmethod
    def with_installed(cls, builtin: Iterable[type[Any]],
                       entry_points: Callable[[], Iterable[metadata.EntryPoint]] | None = None) -> PluginRegistry:
        """The built-in types plus what installed packages register under ``epp.plugins``."""
        found = (entry_points or (lambda: metadata.entry_points(group=ENTRY_POINT_GROUP)))()
        return cls(builtin, {ep.name: ep for ep in found})

    def names(self) -> list[str]:
        return sorted({*self._types, *self._installed})

    def get(self, type_name: str, path: str) -> PluginType:
        """The type, importing an installed one on first use; ConfigError at ``path`` otherwise."""
        known = self._types.get(type_name)
        if known is not None:
            return known
        ep = self._installed.get(type_name)
        if ep is None:
            raise ConfigError(path, f"unknown plugin type {show(type_name)} (known: {', '.join(self.names())})")
        origin = ep.dist.name if ep.dist is not None else ep.value
        try:
            cls = ep.load()
        except Exception as e:
            raise ConfigError(path, f"plugin type {show(type_name)} from {origin} cannot be imported "
                                    f"({type(e).__name__}: {show(str(e))})") from None
        if not isinstance(cls, type):
            raise ConfigError(path, f"plugin type {show(type_name)} from {origin}: {ep.value} is not a class")
        try:
            t = check_contract(cls, origin)
        except ContractError as e:
            raise ConfigError(path, f"plugin type {show(type_name)} from {origin}: {e}") from None
        if t.type_name != type_name:
            raise ConfigError(path, f"{origin} registers {show(type_name)} for a class whose type_name is "
                                    f"{show(t.type_name)}")
        self._types[type_name] = t
        return t
