"""The layering, checked on the imports: production code never imports the test fleet, protocol
adapters do not parse requests or read usage, and the scheduler knows nothing above it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "epp"
TOOLING = ("epp.sim", "epp.stack", "epp.bench", "epp.demo", "epp.tuning")  # epp.tuning: offline tools on the simulator
COMMANDS = {"epp.cli"}  # the command line runs `epp sim`, `epp bench`, `epp demo` too


def module_name(path: Path) -> str:
    return ".".join(("epp", *path.relative_to(ROOT).with_suffix("").parts)).removesuffix(".__init__")


def imports_of(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return found


MODULES = {module_name(p): p for p in ROOT.rglob("*.py") if "v1" not in p.relative_to(ROOT).parts}


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


@pytest.mark.parametrize("module", sorted(m for m in MODULES if not _under(m, TOOLING) and m not in COMMANDS))
def test_production_code_never_imports_test_tooling(module: str) -> None:
    assert not [i for i in imports_of(MODULES[module]) if _under(i, TOOLING)]


@pytest.mark.parametrize("module", ["epp.server.extproc", "epp.server.pickapi"])
def test_protocol_adapters_speak_their_protocol_only(module: str) -> None:
    banned = ("epp.requestcontrol.parsing", "epp.requestcontrol.usage", "epp.requestcontrol.policies",
              "epp.scheduling")
    assert not [i for i in imports_of(MODULES[module]) if _under(i, banned)]


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("epp.scheduling")))
def test_the_scheduler_does_not_know_the_layers_above_it(module: str) -> None:
    assert not [i for i in imports_of(MODULES[module]) if _under(i, ("epp.requestcontrol", "epp.server"))]
