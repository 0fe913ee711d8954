"""Integration: real agents tell a test "service manager" what systemd would hear.

Each test binds an AF_UNIX datagram socket in its tmp dir and starts agents with
``NOTIFY_SOCKET`` pointing at it, as systemd does for ``Type=notify``. The seed says
READY=1 once it listens; the joiner once it has joined, then STOPPING=1 on SIGTERM,
in that order. With ``WATCHDOG_USEC`` the agent pings WATCHDOG=1 at half the interval
until it leaves (``rumor leave`` here), and not at all when ``WATCHDOG_PID`` names
another process.
"""

from __future__ import annotations

import itertools
import signal
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ..agents import Agent, AgentCluster, rumor, wait_for


class Manager:
    """The receiving end of ``$NOTIFY_SOCKET``: every datagram, with when it came."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.got: list[tuple[float, dict[str, str]]] = []

    def env(self, **more: str) -> dict[str, str]:
        return {"NOTIFY_SOCKET": str(self.path), "WATCHDOG_USEC": "", "WATCHDOG_PID": "",
                **more}

    def receive(self, until: float) -> dict[str, str] | None:
        """The next message, or None when none came before ``until`` (monotonic)."""
        left = until - time.monotonic()
        if left <= 0:
            return None
        self.sock.settimeout(left)
        try:
            data = self.sock.recv(4096)
        except TimeoutError:
            return None
        fields = dict(line.split("=", 1) for line in data.decode().splitlines())
        self.got.append((time.monotonic(), fields))
        return fields

    def wait(self, cond: Callable[[dict[str, str]], bool], timeout: float,
             what: str) -> dict[str, str]:
        """Receive until a message satisfies ``cond``; return it."""
        until = time.monotonic() + timeout
        while (m := self.receive(until)) is not None:
            if cond(m):
                return m
        raise AssertionError(f"timed out after {timeout} s waiting for {what}; "
                             f"got {[m for _, m in self.got]}")

    def drain(self, seconds: float) -> None:
        """Receive whatever comes for ``seconds``."""
        until = time.monotonic() + seconds
        while self.receive(until) is not None:
            pass

    def kinds(self) -> list[str]:
        """The non-watchdog messages in order, as their first key."""
        return [next(iter(m)) for _, m in self.got if "WATCHDOG" not in m]


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[Manager]:
    m = Manager(tmp_path / "notify")
    try:
        yield m
    finally:
        m.sock.close()


def _joined(a: Agent) -> bool:
    return any('"event": "joined"' in line for line in a.log.read_text().splitlines())


def test_ready_after_join_then_stopping_on_sigterm(cluster: AgentCluster, tmp_path: Path,
                                                   manager: Manager) -> None:
    seed_manager = Manager(tmp_path / "seed-notify")
    try:
        seed = Agent("a0", tmp_path, env=seed_manager.env())
        seed.start()
        cluster.agents.append(seed)
        ready = seed_manager.wait(lambda m: "READY" in m, 20, "the seed's READY=1")
        # No seeds: ready once every listener is up, so its API already answers.
        assert seed.members()
        assert ready["STATUS"].startswith("listening, no seeds to join")
    finally:
        seed_manager.sock.close()

    a1 = Agent("a1", tmp_path, env=manager.env())
    a1.start(join=seed)
    cluster.agents.append(a1)
    ready = manager.wait(lambda m: "READY" in m, 20, "READY=1 after the join")
    assert ready == {"READY": "1", "STATUS": ready["STATUS"]}
    assert ready["STATUS"].startswith("joined through 1 member(s); 2 member(s) alive")
    assert _joined(a1), "READY=1 came before the join was done"
    assert a1.status_of("a0") == "alive"

    a1.signal(signal.SIGTERM)
    stopping = manager.wait(lambda m: "STOPPING" in m, 10, "STOPPING=1 after SIGTERM")
    assert stopping == {"STOPPING": "1", "STATUS": "leaving the cluster"}
    assert a1.wait_exit() == 0
    assert manager.kinds() == ["READY", "STOPPING"]
    wait_for(lambda: seed.status_of("a1") == "left", 10, "the seed to see the leave")


def test_watchdog_pings_at_half_the_interval_until_the_leave(
        cluster: AgentCluster, tmp_path: Path, manager: Manager) -> None:
    a = Agent("w0", tmp_path, env=manager.env(WATCHDOG_USEC="1000000"))
    a.start()
    cluster.agents.append(a)
    manager.wait(lambda m: "READY" in m, 20, "READY=1")
    start = len(manager.got)
    manager.drain(2.0)
    pings = [t for t, m in manager.got[start:] if m == {"WATCHDOG": "1"}]
    # Every 0.5 s, so about 4 in 2 s; no gap as long as the interval (systemd's limit).
    assert len(pings) >= 3, manager.got
    gaps = [b - t for t, b in itertools.pairwise(pings)]
    assert max(gaps) < 1.0, gaps

    rumor("leave", "--api", a.api)
    manager.wait(lambda m: "STOPPING" in m, 10, "STOPPING=1 after `rumor leave`")
    # The pinging task does not hold the agent up: it exits after its leave.
    assert a.wait_exit() == 0
    assert manager.kinds() == ["READY", "STOPPING"]


def test_no_pings_for_a_watchdog_meant_for_another_process(
        cluster: AgentCluster, tmp_path: Path, manager: Manager) -> None:
    a = Agent("w1", tmp_path, env=manager.env(WATCHDOG_USEC="400000", WATCHDOG_PID="1"))
    a.start()
    cluster.agents.append(a)
    manager.wait(lambda m: "READY" in m, 20, "READY=1")
    manager.drain(0.8)
    assert [m for _, m in manager.got if "WATCHDOG" in m] == []
