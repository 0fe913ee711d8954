"""Fixtures shared by the tests, the ``cluster`` marker, and what lets the suite run in
parallel (pytest-xdist, ``-n`` in pyproject's addopts).

The tests mirror the packages (``gossip/``, ``policy/``, ``proxy/``, ``sim/``); the
ones that start real agent processes live in ``cluster/`` and carry the ``cluster``
marker, so ``pytest -m "not cluster"`` runs the in-process tests alone (under a
minute).

Parallel workers share two cores, so a test that bounds wall time or a rate (or
measures delays on a real kernel, as everything under ``lab/`` may) carries the
``alone`` marker: it waits until no other worker runs a test, and no other test starts
until it is done (a readers-writer lock on a file, below). Ports come from
``tests/ports.py`` (a block per worker); ``tmp_path`` is per worker already.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from .agents import AgentCluster

TESTS = Path(__file__).parent
CLUSTER_DIR = TESTS / "cluster"
#: Real network namespaces, delay lines and timings: never beside another test.
LAB_DIR = TESTS / "lab"
ALONE_DIRS = (LAB_DIR,)


@pytest.fixture(scope="session", autouse=True)
def _bytecode_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Let the agents and CLI runs that the tests start reuse compiled bytecode.

    Where PYTHONDONTWRITEBYTECODE is set (some sandboxes set it), every one of the
    suite's several hundred ``python -m rumor.cli`` processes compiles the package's
    modules again, ~0.3 s each. For this run they write bytecode under a cache folder
    in pytest's temp dir (PYTHONPYCACHEPREFIX; pytest removes old runs' folders, and the
    source tree stays free of ``__pycache__`` as the variable asked). The code that runs
    is the same; only Python's compile cache differs. Where the variable is unset,
    nothing changes.
    """
    if not os.environ.get("PYTHONDONTWRITEBYTECODE"):
        yield
        return
    saved = {k: os.environ.get(k) for k in ("PYTHONDONTWRITEBYTECODE", "PYTHONPYCACHEPREFIX")}
    del os.environ["PYTHONDONTWRITEBYTECODE"]
    os.environ.setdefault("PYTHONPYCACHEPREFIX", str(tmp_path_factory.mktemp("pycache")))
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _alone(item: pytest.Item | None) -> bool:
    return item is not None and item.get_closest_marker("alone") is not None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    """Setup, call and teardown of an ``alone`` test hold the run's lock exclusively,
    every other test's hold it shared (only under xdist: a lone process is alone).
    Consecutive ``alone`` tests keep the lock, so a module of them (``lab/``) waits for
    the other worker once, not once a test."""
    basetemp = item.config.option.basetemp  # under xdist, the run's basetemp / "gwN"
    if "PYTEST_XDIST_WORKER" not in os.environ or not basetemp:
        yield
        return
    lock = _RunLock.of(Path(basetemp).parent / "alone")
    lock.acquire(exclusive=_alone(item))
    try:
        yield
    finally:
        if not (_alone(item) and _alone(nextitem)):
            lock.release()


class _RunLock:
    """A readers-writer lock shared by the workers of one run (files in the run's
    basetemp, which pytest cleans up). A turnstile taken first keeps new readers out
    while a writer waits, so an ``alone`` test is not starved."""

    _held: _RunLock | None = None

    def __init__(self, base: Path) -> None:
        self.turnstile = open(f"{base}.turnstile", "a")  # noqa: SIM115 (kept for the run)
        self.lock = open(f"{base}.lock", "a")  # noqa: SIM115
        self.mode: int | None = None

    @classmethod
    def of(cls, base: Path) -> _RunLock:
        if cls._held is None:
            cls._held = cls(base)
        return cls._held

    def acquire(self, exclusive: bool) -> None:
        mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
        if self.mode == mode:
            return
        if self.mode is not None:
            self.release()
        fcntl.flock(self.turnstile, fcntl.LOCK_EX)
        try:
            fcntl.flock(self.lock, mode)
        finally:
            fcntl.flock(self.turnstile, fcntl.LOCK_UN)
        self.mode = mode

    def release(self) -> None:
        if self.mode is not None:
            fcntl.flock(self.lock, fcntl.LOCK_UN)
            self.mode = None


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if CLUSTER_DIR in item.path.parents:
            item.add_marker(pytest.mark.cluster)
        if any(d in item.path.parents for d in ALONE_DIRS):
            item.add_marker(pytest.mark.alone)
    if "PYTEST_XDIST_WORKER" in os.environ:
        items[:] = _parallel_order(items)


def _parallel_order(items: list[pytest.Item]) -> list[pytest.Item]:
    """The order in which the workers take modules (``--dist loadscope``: whole modules,
    each in file order). First the cluster modules without an ``alone`` test, the long
    ones, side by side; then the short in-process modules with the modules that hold
    ``alone`` tests spread among them, so that an ``alone`` test waits for a short test
    on the other worker to end, not for a cluster test, and the short modules fill the
    last gaps. Every worker computes the same order from the same collection."""
    modules: dict[Path, list[pytest.Item]] = {}
    for item in items:
        modules.setdefault(item.path, []).append(item)
    # The lab's modules first, while the machine is quietest: their timings are real
    # (a stall of the near backend in test_lab_cluster sends traffic to the far one
    # for seconds, as peak EWMA should; that round is then measured again).
    lab = [m for m in modules if LAB_DIR in m.parents]
    alone = [m for m, its in modules.items() if m not in lab and any(_alone(i) for i in its)]
    cluster = [m for m in modules if m not in alone and m not in lab
               and CLUSTER_DIR in m.parents]
    short = [m for m in modules if m not in alone and m not in cluster and m not in lab]
    rest = list(short)
    for k, m in enumerate(alone):  # evenly spaced among the short ones
        rest.insert(round((k + 1) * len(short) / (len(alone) + 1)) + k, m)
    return [item for m in lab + cluster + rest for item in modules[m]]


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[AgentCluster]:
    """Real agents on 127.0.0.1; whatever is still running at the end is killed."""
    c = AgentCluster(tmp_path)
    try:
        yield c
    finally:
        c.close()
