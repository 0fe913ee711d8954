"""Integration: a rolling upgrade across declared protocols (issue 32). An agent of the
build before them (a git worktree of it) beside two of this one, all on mutual TLS:

- the new agents' registrations with ``protocol=tcp`` reach the old agent's catalog
  as a tag, and nothing else in its catalog is lost (a new record field would have
  made it drop whole messages);
- the new agents advertise what their inbound carries (``rumor.carries``), the old
  one nothing, and the old agent's HTTP/1.1 over mutual TLS (no ALPN) still reaches a
  new inbound, whose server now offers ALPN h2 beside http/1.1, and the other way;
- a new caller opens mesh TCP only to instances whose agent carries it, never to the
  old agent's instance of the same service, and sends gRPC (HTTP/2 streams) only to
  an inbound that carries h2: the old agent's instance of the gRPC service, which it
  can only register as plain HTTP, never gets a call.
"""

from __future__ import annotations

import http.client
import json
import socket
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from rumor.policy.keys import SecretKey
from rumor.proxy.ca import init_ca, issue

from ..agents import Agent, AgentCluster, previous_build, wait_for
from ..backends import Backend
from ..ports import free_port

grpc = pytest.importorskip("grpc")

#: main before declared protocols (issue 32).
PREVIOUS_BUILD = "eb2335a"
HOST = "127.0.0.1"


def test_declared_protocols_in_a_mixed_cluster(tmp_path: Path) -> None:
    with previous_build(tmp_path, PREVIOUS_BUILD) as old_tree:
        if old_tree is None:
            pytest.skip(f"no git history with {PREVIOUS_BUILD} (the previous build) here")
        _mixed(tmp_path, old_tree)


def _get(port: int, service: str) -> tuple[int, str]:
    c = http.client.HTTPConnection(HOST, port, timeout=10)
    try:
        c.request("GET", "/", headers={"host": service})
        r = c.getresponse()
        r.read()
        return r.status, r.getheader("x-backend") or ""
    finally:
        c.close()


def _tcp_round(port: int) -> bytes:
    """Connect to a TCP upstream port, send a line, read the echo (b"" if refused)."""
    with socket.create_connection((HOST, port), timeout=10) as s:
        s.sendall(b"ping\n")
        s.shutdown(socket.SHUT_WR)
        out = b""
        while True:
            got = s.recv(65536)
            if not got:
                return out
            out += got


class _Echo:
    """A TCP echo server that records each connection (a thread per connection)."""

    def __init__(self, name: str) -> None:
        import threading
        self.name = name
        self.connections = 0
        self.sock = socket.create_server((HOST, 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        import threading
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    def _echo(self, conn: socket.socket) -> None:
        with conn:
            while True:
                data = conn.recv(65536)
                if not data:
                    return
                conn.sendall(self.name.encode() + b":" + data)

    def close(self) -> None:
        self.sock.close()


class _Greeter:
    """A grpcio server answering ``greet.Greeter/Hello`` with its name."""

    def __init__(self, name: str) -> None:
        from concurrent import futures
        self.name = name
        self.calls = 0
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            "greet.Greeter", {"Hello": grpc.unary_unary_rpc_method_handler(self.hello)}),))
        self.port = self.server.add_insecure_port(f"{HOST}:0")
        self.server.start()

    def hello(self, request: bytes, context: Any) -> bytes:
        self.calls += 1
        return self.name.encode() + b":" + request


def _mixed(tmp_path: Path, old_tree: Path) -> None:
    ca = tmp_path / "ca"
    init_ca(ca, "test")
    pub = tmp_path / "ops.pub"
    pub.write_text(SecretKey.generate().public.line() + "\n")
    web_old, web_new = Backend("web-old"), Backend("web-new")
    db_old, db_new = _Echo("db-old"), _Echo("db-new")
    greet_old, greet_new = _Greeter("greet-old"), _Greeter("greet-new")
    ports = {n: free_port() for n in ("old_in", "old_out", "new0_out", "new1_in", "db_up")}
    cluster = AgentCluster(tmp_path)

    def tls(node: str, services: list[str]) -> list[str]:
        cert, key = issue(ca, node, services, 1, tmp_path / node)
        return ["--trust-key", str(pub), "--tls-ca", str(ca / "ca.crt"),
                "--tls-cert", str(cert), "--tls-key", str(key)]

    try:
        # The old agent can only register plain services: its db is HTTP to it.
        old = Agent("old0", tmp_path, [
            *tls("old0", ["web", "db", "greet", "api"]),
            "--inbound", f"{HOST}:{ports['old_in']}", "--outbound", f"{HOST}:{ports['old_out']}",
            "--identity", "api",
            "--service", f"name=web,port={web_old.port}",
            "--service", f"name=db,port={db_old.port}",
            "--service", f"name=greet,port={greet_old.port}"],
            env={"PYTHONPATH": str(old_tree / ".typecheck")})
        old.start(None)
        cluster.agents.append(old)
        wait_for(old.members, 20, "the old agent's API")
        new0 = Agent("new0", tmp_path, [
            *tls("new0", ["api"]), "--outbound", f"{HOST}:{ports['new0_out']}",
            "--identity", "api", "--upstream", f"db={HOST}:{ports['db_up']}"])
        new1 = Agent("new1", tmp_path, [
            *tls("new1", ["web", "db", "greet"]), "--inbound", f"{HOST}:{ports['new1_in']}",
            "--service", f"name=web,port={web_new.port}",
            "--service", f"name=greet,port={greet_new.port},protocol=grpc",
            "--service", f"name=db,port={db_new.port},protocol=tcp"])
        for a in (new0, new1):
            a.start(old)
            cluster.agents.append(a)
        wait_for(lambda: cluster.converged(3), 30, "the mixed cluster to converge")

        # The old agent's catalog: every record, the new one's protocol as a tag.
        def old_db() -> list[dict[str, Any]]:
            got: list[dict[str, Any]] = old.get("/v1/catalog/service/db")
            return got
        wait_for(lambda: len(old_db()) == 2, 20, "both db instances in the old catalog")
        by_node = {i["node"]: i for i in old_db()}
        assert "rumor.protocol=tcp" in by_node["new1"]["tags"]
        assert "rumor.protocol=tcp" not in by_node["old0"]["tags"]
        assert "protocol" not in by_node["old0"]  # the old build's own JSON, unchanged
        wait_for(lambda: len(old.get("/v1/catalog/service/web")) == 2, 20,
                 "both web instances in the old catalog")
        # The new agents read the declaration; an instance of the old agent is http.
        wait_for(lambda: len(new0.get("/v1/catalog/service/db")) == 2, 20,
                 "both db instances in new0's catalog")
        new_db = {i["node"]: i for i in new0.get("/v1/catalog/service/db")}
        assert new_db["new1"]["protocol"] == "tcp" and new_db["old0"]["protocol"] == "http"

        # Capabilities: the new inbound says what it carries, the old one nothing.
        members = new0.members()
        assert "tcp" in members["new1"]["tags"].get("rumor.carries", "").split(","), members
        assert "rumor.carries" not in members["old0"]["tags"]

        # HTTP/1.1 over mutual TLS both ways across the versions.
        def spread(port: int) -> Counter[str]:
            seen: Counter[str] = Counter()
            for _ in range(30):
                status, backend = _get(port, "web")
                assert status == 200, (port, status)
                seen[backend] += 1
            return seen
        wait_for(lambda: len(spread(ports["new0_out"])) == 2, 20,
                 "new0's calls to reach both the old and the new web")
        wait_for(lambda: len(spread(ports["old_out"])) == 2, 20,
                 "old0's calls to reach both the old and the new web")

        # Mesh TCP only to the instance whose agent carries it.
        wait_for(lambda: _tcp_round(ports["db_up"]) == b"db-new:ping\n", 20,
                 "a TCP round trip through new0's upstream port")
        for _ in range(20):
            assert _tcp_round(ports["db_up"]) == b"db-new:ping\n"
        assert db_old.connections == 0

        # gRPC: HTTP/2 streams only to the inbound that carries h2.
        channel = grpc.insecure_channel(f"{HOST}:{ports['new0_out']}",
                                        options=[("grpc.default_authority", "greet")])
        hello = channel.unary_unary("/greet.Greeter/Hello")
        try:
            wait_for(lambda: _call(hello) == b"greet-new:hi", 20,
                     "a gRPC call through new0's outbound listener")
            for _ in range(20):
                assert _call(hello) == b"greet-new:hi"
        finally:
            channel.close()
        assert greet_old.calls == 0 and greet_new.calls >= 21

        # Nobody was suspected along the way.
        assert cluster.converged(3)
        for a in cluster.agents:
            doubts = [e for e in a.events() if e.get("event") == "member"
                      and e.get("status") in ("suspect", "failed")]
            assert not doubts, (a.name, json.dumps(doubts))
    finally:
        cluster.close()
        for b in (web_old, web_new):
            b.close()
        for e in (db_old, db_new):
            e.close()
        for g in (greet_old, greet_new):
            g.server.stop(None)


def _call(method: Any) -> bytes | None:
    try:
        out: bytes = method(b"hi", timeout=5)
    except grpc.RpcError:
        return None
    return out
