"""Integration: the wheel a user would install works outside the source tree.

The other tests run rumor from an editable install, which would hide a module missing
from ``packages``, a package-dir mapping gone wrong or a broken entry point. This one
builds the wheel from a copy of the source tree (setuptools builds in ``build/`` inside
the tree it is given, and a stale ``build/lib`` would ship modules deleted since),
checks that it holds every module, installs it into a fresh venv without system site
packages, and runs the installed ``rumor`` script: ``--version`` and a 2-agent join.

The runtime dependencies come from pip's index, pinned to the versions this test
environment runs: those are already in pip's cache after ``pip install -e .``, so the
install is quick and usually needs no network, and the wheel is tried against the very
versions the rest of the suite passed with. Without pip, or without the network pip
needs, the test is skipped with the reason.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
import subprocess
import sys
import tomllib
import urllib.request
import zipfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import pytest

from rumor.gossip.wire import PROTOCOL_VERSION

from ..agents import AgentCluster

ROOT = Path(__file__).resolve().parents[2]
#: Left out of the copy that is built: environments, caches, earlier build output.
NOT_COPIED = shutil.ignore_patterns(
    ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".mypy_cache",
    ".ruff_cache", ".pytest_cache", ".hypothesis", "sim-out")
#: pip's words for "the index could not be reached". "No matching distribution" counts
#: too: the build needs only setuptools and the install only what ``pip install -e .``
#: already found for this environment, so it means an index out of reach, not a typo.
NETWORK_ERRORS = ("NewConnectionError", "Failed to establish a new connection",
                  "Temporary failure in name resolution", "Network is unreachable",
                  "Could not fetch URL", "ConnectTimeoutError", "ReadTimeoutError",
                  "ProxyError", "SSLError", "No matching distribution found")


def _pyproject() -> dict[str, Any]:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


def _pip(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def _skip_or_fail(what: str, res: subprocess.CompletedProcess[str]) -> None:
    out = res.stdout + res.stderr
    for line in out.splitlines():
        if any(e in line for e in NETWORK_ERRORS):
            pytest.skip(f"{what}: pip cannot reach its index here ({line.strip()})")
    raise AssertionError(f"{what} failed ({res.returncode}):\n{out}")


def _expected_files(project: dict[str, Any]) -> set[str]:
    """Every module and marker under the mapped source folders, and the data files a
    package declares (the web UI's), as the wheel names them (a subpackage missing from
    ``packages`` shows up here as missing files)."""
    setup = project["tool"]["setuptools"]
    expected: set[str] = set()
    for package, folder in setup["package-dir"].items():
        prefix = package.replace(".", "/")
        data = setup["package-data"].get(package, [])
        for path in (ROOT / folder).rglob("*"):
            rel = path.relative_to(ROOT / folder).as_posix()
            if path.suffix == ".py" or path.name == "py.typed" or any(
                    fnmatch.fnmatch(rel, pattern) for pattern in data):
                expected.add(f"{prefix}/{rel}")
    return expected


def test_the_web_ui_files_are_package_data() -> None:
    """The files /ui/ serves are among what the wheel must hold (checked below)."""
    expected = _expected_files(_pyproject())
    for name in ("index.html", "app.js", "style.css"):
        assert f"rumor/proxy/ui/{name}" in expected


def _pins(project: dict[str, Any]) -> list[str]:
    """The runtime dependencies at the versions installed here."""
    pins = []
    for req in project["project"]["dependencies"]:
        m = re.match(r"[A-Za-z0-9._-]+", req)
        assert m is not None, req
        try:
            pins.append(f"{m.group()}=={version(m.group())}")
        except PackageNotFoundError:
            pins.append(req)  # not installed here: let pip choose within the range
    return pins


def test_wheel_installs_in_a_fresh_venv_and_joins(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    if _pip("--version", timeout=30).returncode != 0:
        pytest.skip("no pip in this environment: cannot build a wheel")
    project = _pyproject()
    release = project["project"]["version"]

    src, dist = tmp_path / "src", tmp_path / "dist"
    shutil.copytree(ROOT, src, ignore=NOT_COPIED)
    res = _pip("wheel", "--no-deps", "-q", "-w", str(dist), str(src), timeout=120)
    if res.returncode != 0:
        _skip_or_fail("building the wheel", res)
    (wheel,) = dist.glob("rumor-*.whl")
    assert wheel.name.startswith(f"rumor-{release}-py3-none-any")
    with zipfile.ZipFile(wheel) as z:
        names = {n for n in z.namelist() if ".dist-info/" not in n}
        entry_points = z.read(f"rumor-{release}.dist-info/entry_points.txt").decode()
    expected = _expected_files(project)
    missing, extra = expected - names, names - expected
    assert not missing, f"the wheel lacks {sorted(missing)} (a package left out of packages?)"
    assert not extra, f"the wheel holds files that are not in the source: {sorted(extra)}"
    assert "rumor = rumor.cli.main:main" in entry_points
    with zipfile.ZipFile(wheel) as z:  # the UI's files are the source's, byte for byte
        for name in ("index.html", "app.js", "style.css"):
            assert z.read(f"rumor/proxy/ui/{name}") == (ROOT / "proxy/ui" / name).read_bytes()

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=60)
    python, rumor = venv / "bin" / "python", venv / "bin" / "rumor"
    constraints = tmp_path / "constraints.txt"
    constraints.write_text("\n".join(_pins(project)) + "\n")
    res = _pip("--python", str(python), "install", "-q", "-c", str(constraints), str(wheel),
               timeout=300)
    if res.returncode != 0:
        _skip_or_fail("installing the wheel", res)

    # Nothing may come from the source tree: run from elsewhere, with no PYTHONPATH.
    monkeypatch.delenv("PYTHONPATH", raising=False)
    monkeypatch.chdir(tmp_path)
    where = subprocess.run([str(python), "-c", "import rumor.cli; print(rumor.cli.__file__)"],
                           capture_output=True, text=True, check=True, timeout=30)
    assert Path(where.stdout.strip()).is_relative_to(venv), where.stdout
    shown = subprocess.run([str(rumor), "--version"], capture_output=True, text=True,
                           timeout=30)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.strip() == f"rumor {release} (gossip protocol {PROTOCOL_VERSION})"

    cluster = AgentCluster(tmp_path, command=[str(rumor)])
    try:
        agents = cluster.start(2)
        me = agents[1].get("/v1/self")
        assert (me["version"], me["protocol"]) == (release, PROTOCOL_VERSION)
        assert any(e.get("event") == "start" and e.get("version") == release
                   for e in _log_lines(agents[1].log))
        # The installed agent serves the UI from the wheel's own package data.
        with urllib.request.urlopen(f"http://{agents[1].api}/ui/app.js", timeout=5) as r:
            assert r.read() == (ROOT / "proxy/ui/app.js").read_bytes()
    finally:
        cluster.close()


def _log_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()
            if line.startswith("{")]
