"""Endpoint sources: a static list (--endpoints) and a watched YAML file (--endpoints-file)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

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


@dataclass(frozen=True, slots=True)
class EndpointList:
    """An endpoints file: the addresses, and the labels given for some of them."""

    addresses: list[str]
    labels: dict[str, dict[str, str]] = field(default_factory=dict)
    names: dict[str, str] = field(default_factory=dict)  # namespace/name, when the file gives them


def parse_endpoints_yaml(text: str, where: str) -> EndpointList:
    """A YAML list (or ``{endpoints: [...]}``) of HOST:PORT strings, or of ``{address: HOST:PORT,
    labels: {key: value}}`` mappings: the labels a pod would carry in Kubernetes (the P/D role
    ``llm-d.ai/role: prefill``), for the label filters. The reference's file-discovery entries
    (``name``, ``namespace``, ``address`` without its port, ``port``, ``labels``) read too."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ValueError(f"{where}: invalid YAML: {e}") from None
    if isinstance(data, dict):
        data = data.get("endpoints")
    if data is None:
        return EndpointList([])
    if not isinstance(data, list):
        raise ValueError(f"{where}: expected a list of HOST:PORT")
    out: list[str] = []
    labels: dict[str, dict[str, str]] = {}
    names: dict[str, str] = {}
    for i, item in enumerate(data):
        path = f"{where}[{i}]"
        if isinstance(item, dict):
            unknown = sorted(set(item) - {"address", "labels", "name", "namespace", "port"})
            if unknown:
                raise ValueError(f"{path}.{unknown[0]}: unknown field "
                                 "(allowed: address, labels, name, namespace, port)")
            address, given = item.get("address"), item.get("labels") or {}
            if not isinstance(address, str):
                raise ValueError(f"{path}.address: expected a HOST:PORT string, got {address!r}")
            port = item.get("port")
            if port is not None:
                if isinstance(port, bool) or not isinstance(port, int | str) or not str(port).isdigit():
                    raise ValueError(f"{path}.port: expected a port number, got {port!r}")
                host = f"[{address}]" if ":" in address and not address.startswith("[") else address
                address = f"{host}:{port}"
            name = item.get("name")
            if name is not None:
                if not isinstance(name, str) or not name:
                    raise ValueError(f"{path}.name: expected a string, got {name!r}")
                ns = item.get("namespace") or "default"
                names[parse_address(address, f"{path}.address")] = f"{ns}/{name}"
            if not isinstance(given, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                      for k, v in given.items()):
                raise ValueError(f"{path}.labels: expected a mapping of strings to strings")
            item = address
            if given:
                labels[parse_address(address, f"{path}.address")] = dict(given)
        if not isinstance(item, str):
            raise ValueError(f"{path}: expected a HOST:PORT string (or address and labels), got {item!r}")
        out.append(parse_address(item, path))
    return EndpointList(out, labels, names)


def endpoints_watcher(path: str, store: Datastore, interval: float = 0.5) -> WatchedFile[EndpointList]:
    """Watches an endpoints file; a bad edit is logged and the old set kept."""
    return WatchedFile(path, lambda t: parse_endpoints_yaml(t, path),
                       lambda found: store.set_endpoints(found.addresses, found.labels, found.names),
                       what="endpoint list", interval=interval)
