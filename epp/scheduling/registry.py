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

import difflib
import inspect
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from importlib import metadata
from types import MappingProxyType
from typing import Any

from epp.scheduling.contract import HOOKS
from epp.scheduling.contract import ROLE_METHODS as SCHEDULING_ROLE_METHODS
from epp.scheduling.contract import ROLES as SCHEDULING_ROLES
from epp.scheduling.params import show
from epp.scheduling.types import ConfigError

ENTRY_POINT_GROUP = "epp.plugins"


KNOWN_LIST_CHARS = 600  # an unknown type's error lists the known ones up to this long


@dataclass(frozen=True, slots=True)
class Roles:
    """The roles a registry accepts (protocol, name) and each one's methods. The scheduling
    roles by default; the config adds the layers above (flow control, request control)."""

    roles: tuple[tuple[type[Any], str], ...] = SCHEDULING_ROLES
    methods: Mapping[type[Any], tuple[str, ...]] = field(
        default_factory=lambda: MappingProxyType(SCHEDULING_ROLE_METHODS))
    hooks: tuple[tuple[type[Any], tuple[str, ...]], ...] = HOOKS

    def plus(self, roles: tuple[tuple[type[Any], str], ...], methods: Mapping[type[Any], tuple[str, ...]],
             hooks: tuple[tuple[type[Any], tuple[str, ...]], ...] = ()) -> Roles:
        return Roles(self.roles + roles, MappingProxyType({**self.methods, **methods}), self.hooks + hooks)


SCHEDULING = Roles()


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


def check_contract(cls: type[Any], origin: str = "epp", known: Roles = SCHEDULING) -> PluginType:
    """Validate ``cls`` as a plugin type with one of ``known``'s roles; raises ContractError."""
    type_name = cls.__dict__.get("type_name")
    if not isinstance(type_name, str) or not type_name:
        raise ContractError(f"{cls.__qualname__} has no type_name")
    roles = [(proto, role) for proto, role in known.roles if proto in cls.__mro__]
    if len(roles) != 1:
        names = ", ".join(proto.__name__ for proto, _ in known.roles)
        raise ContractError(f"{type_name}: a plugin subclasses exactly one of {names} (found {len(roles)})")
    role_proto, role = roles[0]
    checks: list[tuple[type[Any], str]] = [(role_proto, m) for m in known.methods[role_proto]]
    declared_methods: set[str] = set(known.methods[role_proto])  # its role's own methods are declared
    for hook, methods in known.hooks:
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
    for hook, methods in known.hooks:
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

    def __init__(self, builtin: Iterable[type[Any]], installed: Mapping[str, metadata.EntryPoint] | None = None,
                 known: Roles = SCHEDULING) -> None:
        self.known = known
        self._types: dict[str, PluginType] = {}
        for cls in builtin:
            t = check_contract(cls, known=known)
            self._types[t.type_name] = t
        self._installed = {k: v for k, v in (installed or {}).items() if k not in self._types}
        self.shadowed = sorted(k for k in (installed or {}) if k in self._types)

    @classmethod
    def with_installed(cls, builtin: Iterable[type[Any]],
                       entry_points: Callable[[], Iterable[metadata.EntryPoint]] | None = None,
                       known: Roles = SCHEDULING) -> PluginRegistry:
        """The built-in types plus what installed packages register under ``epp.plugins``."""
        found = (entry_points or (lambda: metadata.entry_points(group=ENTRY_POINT_GROUP)))()
        return cls(builtin, {ep.name: ep for ep in found}, known)

    def names(self) -> list[str]:
        return sorted({*self._types, *self._installed})

    def get(self, type_name: str, path: str) -> PluginType:
        """The type, importing an installed one on first use; ConfigError at ``path`` otherwise."""
        known = self._types.get(type_name)
        if known is not None:
            return known
        ep = self._installed.get(type_name)
        if ep is None:
            names = self.names()
            listed = ", ".join(names)
            if len(listed) > KNOWN_LIST_CHARS:  # one line stays readable: the closest names, and a count
                close = difflib.get_close_matches(type_name, names, n=3, cutoff=0.6)
                hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
                listed = f"{hint}{len(names)} types are known; the README lists them"
            else:
                listed = f"known: {listed}"
            raise ConfigError(path, f"unknown plugin type {show(type_name)} ({listed})")
        origin = ep.dist.name if ep.dist is not None else ep.value
        try:
            cls = ep.load()
        except Exception as e:
            raise ConfigError(path, f"plugin type {show(type_name)} from {origin} cannot be imported "
                                    f"({type(e).__name__}: {show(str(e))})") from None
        if not isinstance(cls, type):
            raise ConfigError(path, f"plugin type {show(type_name)} from {origin}: {ep.value} is not a class")
        try:
            t = check_contract(cls, origin, self.known)
        except ContractError as e:
            raise ConfigError(path, f"plugin type {show(type_name)} from {origin}: {e}") from None
        if t.type_name != type_name:
            raise ConfigError(path, f"{origin} registers {show(type_name)} for a class whose type_name is "
                                    f"{show(t.type_name)}")
        self._types[type_name] = t
        return t
