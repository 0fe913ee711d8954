"""The layers, read off the imports: gossip knows no HTTP and no policy; dependencies
flow gossip <- policy <- proxy <- cli (simulations use gossip, policy, and of proxy only
its sans-IO request-path cores, the very code the simulator runs); and the sans-IO
cores reach no clock, socket, OS or global randomness — they get ``now`` and a
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
    "simulations": {"gossip", "policy", "proxy"},  # proxy: SIM_PROXY_CORES only
    "cli": {"gossip", "policy", "proxy", "simulations"},
}
#: The modules of proxy that simulations may import: sans-IO cores of the request path
#: (the coming balancers, faults and ratelimit included). No shell, no socket, no trio.
SIM_PROXY_CORES = {"attempts", "balancer", "resilience", "balancers", "faults", "ratelimit"}
#: Third-party modules a package must not import.
FORBIDDEN = {"gossip": {"httpcore", "h11", "httptools"}, "policy": {"httpcore", "h11"}}
#: The data path: httptools and sockets only (h11 serves the API, httpcore the checks).
DATA_PATH = [f"proxy/{m}.py" for m in (
    "codec", "inbound", "outbound", "pool", "relay", "sockio", "tls", "attempts", "headers")]

#: A module that does I/O says so on its first line; every other module of these
#: packages is a sans-IO core and is checked as one, so a new core cannot escape.
SHELL_MARK = "# layer: shell"
CORE_PACKAGES = ("gossip", "policy", "proxy", "simulations")


def _is_shell(path: Path) -> bool:
    with path.open(encoding="utf-8") as f:
        return f.readline().startswith(SHELL_MARK)


CORES = sorted(str(p.relative_to(ROOT)) for pkg in CORE_PACKAGES
               for p in (ROOT / pkg).rglob("*.py") if not _is_shell(p))
CORE_FORBIDDEN = {"trio", "socket", "time", "os", "selectors", "asyncio", "threading"}


def _imports(path: Path, source: str | None = None) -> tuple[set[str], set[str]]:
    """(top-level modules imported, rumor packages imported) by ``path``."""
    package = path.relative_to(ROOT).parts[0]
    return _read_imports(path, source)[0], {m[0] for m in _ours(path, source)} - {package}


def _ours(path: Path, source: str | None = None) -> set[tuple[str, ...]]:
    """The rumor modules ``path`` imports, as (package, module, ...) below ``rumor``;
    ``from ..proxy import attempts`` counts as ("proxy", "attempts")."""
    return _read_imports(path, source)[1]


def _read_imports(path: Path, source: str | None) -> tuple[set[str], set[tuple[str, ...]]]:
    rel = path.relative_to(ROOT).parts
    package = rel[0]
    tree = ast.parse(path.read_text() if source is None else source)
    modules: set[str] = set()
    ours: set[tuple[str, ...]] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                modules.add(alias.name.split(".")[0])
                if alias.name.startswith("rumor."):
                    ours.add(tuple(alias.name.split(".")[1:]))
        elif isinstance(node, ast.ImportFrom):
            name = node.module or ""
            if node.level == 0:
                modules.add(name.split(".")[0])
                if not name.startswith("rumor."):
                    continue
                parts = tuple(name.split(".")[1:])
            else:
                depth = len(rel) - 1  # folders below the root
                if node.level > depth and not name:  # ``from .. import proxy``
                    ours.update((a.name,) for a in node.names)
                    continue
                if node.level > depth:
                    parts = tuple(name.split("."))
                elif node.level == depth:
                    parts = (package, *(name.split(".") if name else ()))
                else:
                    continue  # inside a subpackage of the same package
            if len(parts) == 1:  # ``from ..proxy import attempts``: the names are modules
                ours.update((parts[0], a.name) for a in node.names)
            elif parts:
                ours.add(parts)
    return modules, ours


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


@pytest.mark.parametrize("path", sorted((ROOT / "simulations").rglob("*.py")),
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_simulations_import_only_the_sans_io_cores_of_proxy(path: Path) -> None:
    _check_simulation_imports(path)


def _check_simulation_imports(path: Path, source: str | None = None) -> None:
    for mod in _ours(path, source):
        if mod[0] == "proxy":
            assert len(mod) > 1 and mod[1] in SIM_PROXY_CORES, \
                f"simulations may import only {sorted(SIM_PROXY_CORES)} of proxy, not {mod}"


@pytest.mark.parametrize("source", [
    "from ..proxy.outbound import OutboundProxy",
    "from ..proxy import relay",
    "from rumor.proxy.pool import UpstreamPool",
    "import rumor.proxy.sockio",
    "from ..proxy import attempts, inbound",
    "from .. import proxy",
])
def test_a_proxy_shell_imported_by_simulations_fails_the_check(source: str) -> None:
    with pytest.raises(AssertionError):
        _check_simulation_imports(ROOT / "simulations" / "x.py", source)


@pytest.mark.parametrize("source", [
    "from ..proxy.attempts import Attempts", "from ..proxy import balancer, resilience",
    "import rumor.proxy.balancers", "from rumor.proxy.faults import FaultTable",
    "from ..gossip.config import profile",
])
def test_the_cores_imported_by_simulations_pass_the_check(source: str) -> None:
    _check_simulation_imports(ROOT / "simulations" / "x.py", source)


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


def test_the_core_list_is_read_off_the_tree() -> None:
    # The modules the pipeline and the protocols rest on are among the checked ones.
    for name in ("gossip/rules.py", "proxy/attempts.py", "proxy/balancer.py",
                 "proxy/observe.py", "proxy/mesh_view.py", "policy/evaluate.py"):
        assert name in CORES
    assert "proxy/outbound.py" not in CORES and "gossip/node.py" not in CORES
