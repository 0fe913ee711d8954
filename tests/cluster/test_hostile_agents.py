"""Real agents under attack on loopback: one poisonous datagram, frames declared huge
before authentication, descriptor exhaustion and a flood of Host names. The invariant:
every agent stays up, keeps its members alive and answers its API."""

from __future__ import annotations

import contextlib
import os
import resource
import socket
import struct
import time
import urllib.request
from pathlib import Path

import pytest

from rumor.gossip.keyring import Keyring, KeyringSeal, decode_key
from rumor.gossip.keyring_file import generate_key

from ..agents import HOST, Agent, AgentCluster, free_port, wait_for
from ..gossip.test_hostile import ALIVE, DEAD, PING, Deep, packet

#: Each of these once killed an agent (and, gossiped on, the whole cluster).
POISON = [
    [[ALIVE, 1, "nul", ["127.0.0.1\x00", 7946], {}]],
    [[ALIVE, 1, "label", ["a" * 64 + ".example", 7946], {}]],
    [[ALIVE, 1, "port", ["127.0.0.1", 0], {}]],
    [[DEAD, 2**64 - 1, "a1", "x"]],
    [[DEAD, 2**53 - 1, "a2", "x"]],
    [[PING, Deep(1000), "a0", "x"]],
    [Deep(1000)],  # the message itself nested: its decode error once repr()-ed it
    [[ALIVE, 1, Deep(600), ["127.0.0.1", 1], {}]],
    [[PING, i, "a0", "x"] for i in range(3000)],
]


def _start(cluster: AgentCluster, n: int, extra: list[str]) -> list[Agent]:
    return cluster.start(n, extra)


def _stats(a: Agent) -> dict[str, int]:
    return dict(a.get("/v1/health")["stats"])


def _never_down(cluster: AgentCluster, seconds: float) -> None:
    """Every agent alive, seen alive by every agent, for ``seconds``."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for a in cluster.agents:
            assert a.proc is not None and a.proc.poll() is None, f"{a.name} died"
            members = a.members()
            down = [m for m in members.values() if m["status"] != "alive"
                    and m["name"] in {b.name for b in cluster.agents}]
            assert members and not down, f"{a.name} sees {down}"
        time.sleep(0.1)


@pytest.mark.parametrize("keyed", [False, True], ids=["plaintext", "keyed"])
def test_one_datagram_cannot_take_a_cluster_down(cluster: AgentCluster, tmp_path: Path,
                                                 keyed: bool) -> None:
    extra: list[str] = []
    seal = None
    if keyed:  # the attacker holds the key: a compromised agent, or a stolen key file
        key = generate_key()
        ring = tmp_path / "ring"
        ring.write_text(key + "\n")
        ring.chmod(0o600)
        extra = ["--keyring", str(ring)]
        seal = KeyringSeal(Keyring([decode_key(key)]), wall_offset=0.0,
                           random_bytes=os.urandom)
    agents = _start(cluster, 3, extra)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for msgs in POISON:
            data = packet(*msgs)
            for a in agents:
                out = data if seal is None else seal.seal(time.time(), data, a.name)
                s.sendto(out, (HOST, a.port))
            time.sleep(0.05)
    _never_down(cluster, 4.0)  # several probe rounds and suspicion timeouts (local profile)
    for a in agents:
        st = _stats(a)
        assert st.get("internal_errors", 0) == 0
        assert st["packets_malformed"] >= 5, st
        names = set(a.members())
        assert names == {"a0", "a1", "a2"}, names  # nothing poisonous was learnt


def test_frames_declared_huge_before_authentication_cost_no_memory(
        cluster: AgentCluster, tmp_path: Path) -> None:
    ring = tmp_path / "ring"
    ring.write_text(generate_key() + "\n")
    ring.chmod(0o600)
    (a,) = _start(cluster, 1, ["--keyring", str(ring)])
    time.sleep(0.5)
    before = a.rss_kb()
    socks = []
    chunk = b"\x00" * (1 << 20)
    try:
        for _ in range(50):
            s = socket.create_connection((HOST, a.port), timeout=2)
            socks.append(s)
            s.settimeout(0.2)
            with contextlib.suppress(OSError):
                s.sendall(struct.pack(">I", 16 << 20))  # "16 MiB follow"
                for _ in range(16):
                    s.sendall(chunk)
        time.sleep(0.5)
        grown = a.rss_kb() - before
        assert grown < 8 * 1024, f"RSS grew {grown} KiB"
        assert a.members()  # and the API answers
    finally:
        for s in socks:
            s.close()


def _limit_fds() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))


def open_idle(port: int, n: int) -> list[socket.socket]:
    """``n`` connections to ``port`` that never send a byte (close them after)."""
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            s.connect((HOST, port))
        socks.append(s)
    return socks


def flood_host_names(port: int, start: int, n: int) -> list[bytes]:
    """``n`` requests on one connection, each for a new Host name; their status lines."""
    statuses = []
    with socket.create_connection((HOST, port), timeout=10) as s:
        f = s.makefile("rb")
        for i in range(start, start + n):
            s.sendall(f"GET / HTTP/1.1\r\nhost: scan-{i}.example\r\n\r\n".encode())
            statuses.append(f.readline())
            length = 0
            while (line := f.readline()) not in (b"\r\n", b""):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            f.read(length)
    return statuses


@pytest.mark.alone
def test_idle_proxy_connections_cannot_starve_gossip_or_the_api(
        cluster: AgentCluster) -> None:
    out_port = free_port()
    a0, _ = cluster.start(2, lambda i: ["--outbound", f"{HOST}:{out_port}"] if i == 0 else [],
                          preexec=lambda i: _limit_fds if i == 0 else None)
    socks = open_idle(out_port, 400)
    try:
        time.sleep(1.0)
        t0 = time.monotonic()
        assert a0.members(), "the API stopped answering"
        assert time.monotonic() - t0 < 2.0
        _never_down(cluster, 5.0)
        a2 = Agent("a2", cluster.workdir)  # a join, with push-pull, still gets through
        a2.start(a0)
        cluster.agents.append(a2)
        wait_for(lambda: cluster.converged(3), 15, "a2 to join a0 under the flood")
        log = a0.log.read_text()
        assert "Traceback" not in log
        assert log.count('"accept_failed"') <= 2
    finally:
        for s in socks:
            s.close()


def test_a_flood_of_host_names_leaves_metrics_flat(cluster: AgentCluster) -> None:
    in_port = free_port()
    (a,) = _start(cluster, 1, ["--inbound", f"{HOST}:{in_port}"])

    def flood(start: int, n: int) -> None:
        statuses = flood_host_names(in_port, start, n)
        assert all(st.startswith(b"HTTP/1.1 4") for st in statuses), set(statuses)

    def metrics() -> bytes:
        with urllib.request.urlopen(f"http://{a.api}/metrics", timeout=5) as r:
            return bytes(r.read())

    flood(0, 200)
    size, rss = len(metrics()), a.rss_kb()
    flood(200, 3000)
    text = metrics()
    assert len(text) < size + 2048 and b"scan-" not in text
    assert a.rss_kb() - rss < 4 * 1024
