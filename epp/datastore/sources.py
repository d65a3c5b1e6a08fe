"""Endpoint sources: a static list (--endpoints) and a watched YAML file (--endpoints-file)."""

from __future__ import annotations

import ipaddress

import yaml

from epp.datastore.store import Datastore
from epp.filewatch import WatchedFile


def parse_address(text: str, where: str) -> str:
    """Validate ``host:port`` (IPv6 as ``[::1]:8000``) and return it normalised."""
    text = text.strip()
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{where}: {text!r} is not HOST:PORT")
    if host.startswith("["):
        if not host.endswith("]"):
            raise ValueError(f"{where}: {text!r} has an unclosed IPv6 bracket")
        ipaddress.IPv6Address(host[1:-1])
    return f"{host}:{int(port)}"


def parse_endpoint_list(text: str, where: str = "--endpoints") -> list[str]:
    items = [t for t in text.split(",") if t.strip()]
    if not items:
        raise ValueError(f"{where}: no endpoints given")
    return [parse_address(t, where) for t in items]


def parse_endpoints_yaml(text: str, where: str) -> list[str]:
    """A YAML list of HOST:PORT strings, or ``{endpoints: [...]}``."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ValueError(f"{where}: invalid YAML: {e}") from None
    if isinstance(data, dict):
        data = data.get("endpoints")
    if data is None:
        return []
    if not isinstance(data, list):
        raise ValueError(f"{where}: expected a list of HOST:PORT")
    out = []
    for i, item in enumerate(data):
        if not isinstance(item, str):
            raise ValueError(f"{where}[{i}]: expected a HOST:PORT string, got {item!r}")
        out.append(parse_address(item, f"{where}[{i}]"))
    return out


def endpoints_watcher(path: str, store: Datastore, interval: float = 0.5) -> WatchedFile[list[str]]:
    """Watches a YAML list of HOST:PORT; a bad edit is logged and the old set kept."""
    return WatchedFile(path, lambda t: parse_endpoints_yaml(t, path), store.set_endpoints, what="endpoint list",
                       interval=interval)
