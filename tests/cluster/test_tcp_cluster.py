"""Integration: TCP services behind the mesh (issue 32, part 1), with real agents.

c0 is the caller: upstream ports for ``db`` (a TCP echo on three agents, s1..s3), ``greet``
(a server that speaks first, on s1) and ``secret`` (on s1, behind an access policy that
refuses c0's identity). Plain TCP between the sidecars in one cluster, mutual TLS in a
second (two agents). The services are threads of this test process, so a test can tell
whether a connection ever reached one.
"""

from __future__ import annotations

import contextlib
import re
import resource
import signal
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from rumor.policy.keys import SecretKey
from rumor.proxy.ca import init_ca, issue

from ..agents import Agent, AgentCluster, open_silent, publish_policy, rumor, wait_for
from ..ports import free_port

HOST = "127.0.0.1"


class TcpBackend:
    """A TCP service in a thread: ``echo`` sends back what it reads and half-closes at
    the client's EOF; ``greet`` first says who it is, then echoes."""

    def __init__(self, name: str, mode: str = "echo") -> None:
        self.name = name
        self.mode = mode
        self.sock = socket.create_server((HOST, 0))
        self.port: int = self.sock.getsockname()[1]
        self.accepted = 0
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                if self.mode == "greet":
                    conn.sendall(f"220 {self.name} ready\r\n".encode())
                while data := conn.recv(65536):
                    conn.sendall(data)
                conn.sendall(f"[{self.name} saw EOF]".encode())  # after the client's EOF
                conn.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def close(self) -> None:
        self._stop = True
        self.sock.close()


def _exchange(port: int, data: bytes, *, timeout: float = 10) -> bytes:
    """Connect, send ``data``, half-close, read to EOF."""
    with socket.create_connection((HOST, port), timeout=timeout) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


class Mesh:
    def __init__(self, tmp: Path) -> None:
        self.key = SecretKey.generate()
        pub = tmp / "ops.pub"
        pub.write_text(self.key.public.line() + "\n")
        self.db = [TcpBackend(f"db{i}") for i in range(3)]
        self.greet = TcpBackend("greeter", "greet")
        self.secret = TcpBackend("secret")
        self.ports = {s: free_port() for s in ("db", "greet", "secret")}
        self.cluster = AgentCluster(tmp)
        trust = ["--trust-key", str(pub)]
        self.config = tmp / "c0.toml"
        self.config.write_text("")
        c0 = Agent("c0", tmp, [*trust, "--identity", "web", "--config", str(self.config),
                               *[a for s, p in self.ports.items()
                                 for a in ("--upstream", f"{s}={HOST}:{p}")]])
        c0.start()
        self.cluster.agents.append(c0)
        wait_for(c0.members, 20, "the caller's API")
        for i in range(3):
            extra = [*trust, "--inbound", f"{HOST}:{free_port()}", "--service",
                     f"name=db,id=db-{i},port={self.db[i].port},protocol=tcp"]
            if i == 0:
                extra += ["--service", f"name=greet,port={self.greet.port},protocol=tcp",
                          "--service", f"name=secret,port={self.secret.port},protocol=tcp"]
            a = Agent(f"s{i}", tmp, extra)
            a.start(c0)
            self.cluster.agents.append(a)
        wait_for(lambda: self.cluster.converged(4), 30, "4 agents to converge")
        publish_policy(self.key, self.cluster.agents, "access", "secret-access", 1,
                       'destination = "secret"\ndefault = "deny"\nallow = ["reports"]\n')
        wait_for(lambda: len({_exchange(self.ports["db"], b"?") for _ in range(12)}) == 3,
                 30, "db reachable on all three instances")
        wait_for(lambda: _try_greet(self.ports["greet"]), 30, "greet reachable")

    def close(self) -> None:
        self.cluster.close()
        for b in [*self.db, self.greet, self.secret]:
            b.close()


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    m = Mesh(tmp_path_factory.mktemp("tcp"))
    try:
        yield m
    finally:
        m.close()


def test_a_tcp_echo_through_two_sidecars_with_half_close(mesh: Mesh) -> None:
    big = bytes(range(256)) * 4096  # 1 MiB, both ways
    out = _exchange(mesh.ports["db"], big)
    assert out.startswith(big)
    # The client's EOF reached the service, and its answer after that still came back.
    assert out[len(big):].decode() in {f"[db{i} saw EOF]" for i in range(3)}


@pytest.mark.alone  # bounds wall time: no detection stall
def test_a_server_speaks_first_greeting_arrives_before_the_client_says_anything(
        mesh: Mesh) -> None:
    with socket.create_connection((HOST, mesh.ports["greet"]), timeout=5) as s:
        start = time.monotonic()
        greeting = s.recv(100)
        assert greeting == b"220 greeter ready\r\n"
        assert time.monotonic() - start < 2  # no detection stall
        s.sendall(b"HELO x\r\n")
        assert s.recv(100) == b"HELO x\r\n"


def test_open_connections_spread_over_the_three_instances(mesh: Mesh) -> None:
    """The balancer weighs connect latency x connections open: 30 held at once spread
    over the three instances (one at a time, the fastest would get them all, as for
    HTTP at concurrency 1)."""
    before = [b.accepted for b in mesh.db]
    held = []
    try:
        for _ in range(30):
            s = socket.create_connection((HOST, mesh.ports["db"]), timeout=10)
            held.append(s)
            s.sendall(b"x")
            assert s.recv(1) == b"x"  # relayed: the instance has it open
        got = [b.accepted - n for b, n in zip(mesh.db, before, strict=True)]
    finally:
        for s in held:
            s.close()
    assert sum(got) == 30
    assert min(got) >= 3, got


def test_an_access_rule_refuses_the_caller_before_the_service_sees_a_connection(
        mesh: Mesh) -> None:
    before = mesh.secret.accepted
    with socket.create_connection((HOST, mesh.ports["secret"]), timeout=10) as s, \
            contextlib.suppress(ConnectionResetError):
        assert s.recv(100) == b""  # closed without a byte (or reset)
    time.sleep(0.2)
    assert mesh.secret.accepted == before  # not even a connection
    metrics = urllib.request.urlopen(f"http://{mesh.cluster.agents[0].api}/metrics",
                                     timeout=5).read().decode()
    assert 'rumor_tcp_upstream_connections_total{outcome="access_denied",' \
           'service="secret"}' in metrics
    s0 = urllib.request.urlopen(f"http://{mesh.cluster.agents[1].api}/metrics",
                                timeout=5).read().decode()
    assert 'outcome="access_denied",service="secret",source="unverified"' in s0


def test_the_caller_counts_connections_and_bytes_per_upstream(mesh: Mesh) -> None:
    _exchange(mesh.ports["db"], b"12345")
    metrics = urllib.request.urlopen(f"http://{mesh.cluster.agents[0].api}/metrics",
                                     timeout=5).read().decode()
    assert 'rumor_tcp_upstream_connections_total{outcome="relayed",service="db"}' in metrics
    assert 'rumor_tcp_upstream_bytes_total{direction="sent",service="db"}' in metrics
    assert 'rumor_tcp_upstream_connection_duration_seconds_count{service="db"}' in metrics


def test_a_reload_adds_and_removes_an_upstream(mesh: Mesh) -> None:
    port = free_port()
    mesh.config.write_text(f'upstream = ["greet={HOST}:{port}"]\n')
    mesh.cluster.agents[0].signal(signal.SIGHUP)
    wait_for(lambda: _try_greet(port), 10, "the new upstream port")
    mesh.config.write_text("")
    mesh.cluster.agents[0].signal(signal.SIGHUP)
    wait_for(lambda: not _listening(port), 10, "the removed upstream port to close")
    assert _try_greet(mesh.ports["greet"])  # the command line's ports stay


def _listening(port: int) -> bool:
    try:
        socket.create_connection((HOST, port), timeout=2).close()
    except ConnectionRefusedError:
        return False
    return True


def _try_greet(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=5) as s:
        return s.recv(100).endswith(b"greeter ready\r\n")
    return False


@pytest.mark.parametrize("value, words", [
    ("db", "expected SERVICE=HOST:PORT"),
    ("db=", "expected SERVICE=HOST:PORT"),
    ("d b=127.0.0.1:5432", "is not a service name"),
    ("db=127.0.0.1:99999", "99999"),
])
def test_bad_upstream_values_are_refused_with_a_clear_message(value: str, words: str) -> None:
    r = rumor("agent", "--name", "x", "--upstream", value, check=False)
    assert r.returncode != 0
    assert words in r.stderr, r.stderr


def test_two_upstreams_on_one_port_are_refused(tmp_path: Path) -> None:
    r = rumor("agent", "--name", "x", "--upstream", "a=127.0.0.1:5000",
              "--upstream", "b=127.0.0.1:5000", check=False)
    assert r.returncode != 0
    assert "already the port of upstream a" in r.stderr, r.stderr


def _limit_fds() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))


def test_a_flood_of_an_upstream_port_is_held_to_the_outbound_pool(tmp_path: Path) -> None:
    # 256 descriptors: the caller's outbound pool is about 90 connections, 68 from one
    # host. The flood is 600, from two hosts: over both caps and over the fd limit,
    # where an accept failing with EMFILE used to end the agent.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 2048:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 2048), hard))
    backend = TcpBackend("db")  # echoes until the client's EOF: holds each connection
    cluster = AgentCluster(tmp_path)
    flood: list[socket.socket] = []
    try:
        port = free_port()
        s = Agent("s", tmp_path, ["--inbound", f"{HOST}:{free_port()}", "--service",
                                  f"name=db,port={backend.port},protocol=tcp"])
        s.start()
        cluster.agents.append(s)
        c = Agent("c", tmp_path, ["--upstream", f"db={HOST}:{port}"])
        c.start(s, preexec_fn=_limit_fds)
        cluster.agents.append(c)
        wait_for(lambda: cluster.converged(2), 30, "2 agents to converge")
        wait_for(lambda: _exchange(port, b"?").startswith(b"?"), 30, "db through the port")
        pool = int(re.search(r"outbound (\d+) connections", c.log.read_text())[1])  # type: ignore[index]
        before = backend.accepted
        for source in ("127.0.0.2", "127.0.0.3"):
            flood += open_silent(port, 300, source)
        wait_for(lambda: backend.accepted - before >= pool - 2, 20, "the pool to fill")
        time.sleep(1.0)  # room for more than the pool to get through, if it could
        assert c.proc is not None and c.proc.poll() is None, c.log.read_text()[-3000:]
        assert backend.accepted - before <= pool, (backend.accepted - before, pool)
        assert "c" in c.members() and s.members().get("c", {}).get("status") == "alive"
        for sock in flood:
            sock.close()
        flood.clear()
        # The pool frees as the flood goes: a new connection is carried again.
        wait_for(lambda: _exchange(port, b"again", timeout=3) == b"again[db saw EOF]", 20,
                 "db through the port after the flood")
        assert "Traceback" not in c.log.read_text()
    finally:
        for sock in flood:
            sock.close()
        cluster.close()
        backend.close()


class TlsMesh:
    def __init__(self, tmp: Path) -> None:
        ca = tmp / "ca"
        init_ca(ca, "test")
        self.db = TcpBackend("tls-db")
        self.greet = TcpBackend("tls-greeter", "greet")
        self.ports = {"db": free_port(), "greet": free_port()}
        self.cluster = AgentCluster(tmp)

        def tls(node: str, services: list[str]) -> list[str]:
            cert, key = issue(ca, node, services, 1, tmp / node)
            return ["--tls-ca", str(ca / "ca.crt"), "--tls-cert", str(cert),
                    "--tls-key", str(key)]
        c0 = Agent("t0", tmp, [*tls("t0", ["web"]),
                               *[a for s, p in self.ports.items()
                                 for a in ("--upstream", f"{s}={HOST}:{p}")]])
        c0.start()
        self.cluster.agents.append(c0)
        wait_for(c0.members, 20, "the caller's API")
        s1 = Agent("t1", tmp, [*tls("t1", ["db", "greet"]), "--inbound",
                               f"{HOST}:{free_port()}",
                               "--service", f"name=db,port={self.db.port},protocol=tcp",
                               "--service", f"name=greet,port={self.greet.port},protocol=tcp"])
        s1.start(c0)
        self.cluster.agents.append(s1)
        wait_for(lambda: self.cluster.converged(2), 30, "2 agents to converge")
        wait_for(lambda: _exchange(self.ports["db"], b"?").startswith(b"?"), 30,
                 "db reachable over mutual TLS")
        wait_for(lambda: _try_greet(self.ports["greet"]), 30, "greet reachable")

    def close(self) -> None:
        self.cluster.close()
        self.db.close()
        self.greet.close()


@pytest.fixture(scope="module")
def tls_mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsMesh]:
    m = TlsMesh(tmp_path_factory.mktemp("tcp-tls"))
    try:
        yield m
    finally:
        m.close()


def test_over_mutual_tls_echo_and_half_close(tls_mesh: TlsMesh) -> None:
    big = b"z" * 300_000
    out = _exchange(tls_mesh.ports["db"], big)
    assert out == big + b"[tls-db saw EOF]"  # the EOF crossed as close_notify + FIN
    s1 = urllib.request.urlopen(f"http://{tls_mesh.cluster.agents[1].api}/metrics",
                                timeout=5).read().decode()
    assert 'outcome="accepted",service="db",source="verified"' in s1


def test_over_mutual_tls_a_server_speaks_first(tls_mesh: TlsMesh) -> None:
    assert _try_greet(tls_mesh.ports["greet"])
