"""The layers, read off the imports: gossip knows no HTTP and no policy; dependencies
flow gossip <- policy <- proxy <- cli (simulations use gossip and policy); and the
sans-IO cores reach no clock, socket, OS or global randomness — they get ``now`` and a
``random.Random`` from their shell."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("gossip", "policy", "proxy", "cli", "simulations")

#: What each package may import of the others.
ALLOWED = {
    "gossip": set(),
    "policy": {"gossip"},
    "proxy": {"gossip", "policy"},
    "simulations": {"gossip", "policy"},
    "cli": {"gossip", "policy", "proxy", "simulations"},
}
#: Third-party modules a package must not import.
FORBIDDEN = {"gossip": {"httpcore", "h11", "httptools"}, "policy": {"httpcore", "h11"}}
#: The data path: httptools and sockets only (h11 serves the API, httpcore the checks).
DATA_PATH = [f"proxy/{m}.py" for m in (
    "codec", "inbound", "outbound", "pool", "relay", "sockio", "tls", "attempts", "headers")]

#: The sans-IO cores: state machines driven by a shell.
CORES = [
    *(f"gossip/{m}.py" for m in (
        "address", "anti_entropy", "assembly", "awareness", "backoff", "catalog", "checks",
        "config",
        "core_base", "delegate", "dissemination", "durations", "executor", "probing", "rules",
        "effects", "fields", "keyring", "keyring_commands", "members", "membership",
        "queue", "security", "service_spec", "snapshot", "suspicion", "wire")),
    *(f"policy/{m}.py" for m in (
        "documents", "envelope", "evaluate", "examples", "parser", "replication", "store",
        "trust")),
    "proxy/attempts.py", "proxy/balancer.py", "proxy/balancers.py", "proxy/codec.py",
    "proxy/resilience.py", "proxy/headers.py", "proxy/limits.py",
]
CORE_FORBIDDEN = {"trio", "socket", "time", "os", "selectors", "asyncio", "threading"}


def _imports(path: Path) -> tuple[set[str], set[str]]:
    """(top-level modules imported, rumor packages imported) by ``path``."""
    package = path.relative_to(ROOT).parts[0]
    tree = ast.parse(path.read_text())
    modules: set[str] = set()
    ours: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                modules.add(alias.name.split(".")[0])
                if alias.name.startswith("rumor."):
                    ours.add(alias.name.split(".")[1])
        elif isinstance(node, ast.ImportFrom):
            name = node.module or ""
            if node.level == 0:
                modules.add(name.split(".")[0])
                if name.startswith("rumor."):
                    ours.add(name.split(".")[1])
            else:
                depth = len(path.relative_to(ROOT).parts) - 1  # folders below the root
                if node.level > depth:
                    ours.add(name.split(".")[0])
                elif node.level == depth:
                    ours.add(package)
    return modules, ours - {package}


def _sources() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


@pytest.mark.parametrize("name", DATA_PATH)
def test_the_data_path_uses_neither_h11_nor_httpcore(name: str) -> None:
    modules, _ = _imports(ROOT / name)
    assert not modules & {"h11", "httpcore"}, f"{name} imports {modules & {'h11', 'httpcore'}}"


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_dependencies_flow_one_way(path: Path) -> None:
    package = path.relative_to(ROOT).parts[0]
    modules, ours = _imports(path)
    assert ours <= ALLOWED[package], f"{package} may not import {ours - ALLOWED[package]}"
    bad = modules & FORBIDDEN.get(package, set())
    assert not bad, f"{package} may not import {bad}"


@pytest.mark.parametrize("name", CORES)
def test_cores_reach_no_clock_socket_or_global_random(name: str) -> None:
    path = ROOT / name
    modules, _ = _imports(path)
    assert not modules & CORE_FORBIDDEN, f"{name} imports {modules & CORE_FORBIDDEN}"
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):  # ``random`` only for its ``Random`` type
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and node.value.id == "random"):
            assert node.attr == "Random", f"{name} calls random.{node.attr}"
        if isinstance(node, ast.ImportFrom) and node.module == "random":
            assert [a.name for a in node.names] == ["Random"], name


def test_every_core_is_listed_and_exists() -> None:
    assert all((ROOT / c).exists() for c in CORES)
