"""Integration: mutual TLS between sidecars, identities from certificates, reloads.

a0 calls as ``api`` (outbound); a1 serves ``web`` with a certificate naming web; a2
serves ``db`` but its certificate names only ``other``. One cluster CA, made with
the same code as ``rumor ca``. Tests also speak TLS to a1's inbound listener directly,
as a stranger would.
"""

from __future__ import annotations

import contextlib
import http.client
import socket
import ssl
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from rumor.policy.keys import SecretKey
from rumor.proxy.ca import init_ca, issue

from ..agents import Agent, AgentCluster, publish_policy, wait_for
from ..backends import Backend
from ..ports import free_port

HOST = "127.0.0.1"


class TlsMesh:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.ca = tmp / "ca"
        init_ca(self.ca, "test")
        self.key = SecretKey.generate()
        pub = tmp / "ops.pub"
        pub.write_text(self.key.public.line() + "\n")
        self.version = 0
        self.backends = {"web": Backend("web-b"), "db": Backend("db-b")}
        self.cluster = AgentCluster(tmp)
        self.out_port = free_port()
        self.in_port = free_port()
        self.db_port = free_port()
        specs = [
            ("a0", ["api"], ["--outbound", f"{HOST}:{self.out_port}", "--identity", "api"]),
            ("a1", ["web"], ["--inbound", f"{HOST}:{self.in_port}", "--service",
                             f"name=web,port={self.backends['web'].port}"]),
            ("a2", ["other"], ["--inbound", f"{HOST}:{self.db_port}", "--service",
                               f"name=db,port={self.backends['db'].port}"]),
        ]
        for name, services, extra in specs:
            cert, key = self.issue(name, services)
            a = Agent(name, tmp, ["--trust-key", str(pub), "--tls-ca", str(self.ca / "ca.crt"),
                                  "--tls-cert", str(cert), "--tls-key", str(key), *extra])
            a.start(self.cluster.agents[0] if self.cluster.agents else None)
            self.cluster.agents.append(a)
            if name == "a0":
                wait_for(a.members, 20, "the seed's API")
        wait_for(lambda: self.cluster.converged(3), 30, "3 agents to converge")
        wait_for(lambda: self.get("web")[0] == 200, 20, "web reachable through mTLS")

    def issue(self, node: str, services: list[str], ca: Path | None = None
              ) -> tuple[Path, Path]:
        return issue(ca or self.ca, node, services, 1, self.tmp / node)

    def get(self, service: str, headers: dict[str, str] | None = None
            ) -> tuple[int, dict[str, str], bytes]:
        c = http.client.HTTPConnection(HOST, self.out_port, timeout=10)
        try:
            c.request("GET", "/", headers={"host": service, **(headers or {})})
            r = c.getresponse()
            return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
        finally:
            c.close()

    def direct(self, ctx: ssl.SSLContext, headers: dict[str, str]) -> tuple[int, dict[str, str]]:
        """A request straight to a1's inbound listener over TLS with ``ctx``."""
        c = http.client.HTTPSConnection(HOST, self.in_port, context=ctx, timeout=10)
        try:
            c.request("GET", "/", headers={"host": "web", **headers})
            r = c.getresponse()
            r.read()
            return r.status, {k.lower(): v for k, v in r.getheaders()}
        finally:
            c.close()

    def client_context(self, node: str, services: list[str], ca: Path | None = None
                       ) -> ssl.SSLContext:
        cert, key = self.issue(node, services, ca)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.load_verify_locations(str(self.ca / "ca.crt"))
        ctx.load_cert_chain(str(cert), str(key))
        return ctx

    def publish(self, kind: str, name: str, body: str) -> None:
        self.version += 1
        publish_policy(self.key, self.cluster.agents, kind, name, self.version, body)

    def close(self) -> None:
        self.cluster.close()
        for b in self.backends.values():
            b.close()


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsMesh]:
    m = TlsMesh(tmp_path_factory.mktemp("tls"))
    try:
        yield m
    finally:
        m.close()


def test_calls_cross_the_mesh_over_mutual_tls(mesh: TlsMesh) -> None:
    status, hs, _ = mesh.get("web")
    assert status == 200 and hs["x-backend"] == "web-b"
    assert "mutual TLS on the sidecar hop: node a1 of cluster test, services web" in \
        mesh.cluster.agents[1].log.read_text()


def test_a_host_whose_certificate_does_not_name_the_service_is_not_called(
        mesh: TlsMesh) -> None:
    status, hs, _ = mesh.get("db")
    assert status in (502, 503)
    assert "does not name service 'db'" in hs["x-rumor-error"]
    assert mesh.backends["db"].hits == 0


def test_no_certificate_or_a_stranger_certificate_cannot_reach_an_inbound_listener(
        mesh: TlsMesh) -> None:
    hits = mesh.backends["web"].hits
    # Plain HTTP to the TLS port: the handshake fails and the connection closes.
    c = http.client.HTTPConnection(HOST, mesh.in_port, timeout=10)
    with pytest.raises((http.client.HTTPException, OSError)):
        c.request("GET", "/", headers={"host": "web"})
        c.getresponse().read()
    c.close()
    # TLS without a client certificate.
    anon = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    anon.check_hostname = False
    anon.load_verify_locations(str(mesh.ca / "ca.crt"))
    with pytest.raises((ssl.SSLError, OSError, http.client.HTTPException)):
        mesh.direct(anon, {})
    # A certificate from another CA.
    other_ca = mesh.tmp / "other-ca"
    init_ca(other_ca, "test")
    with pytest.raises((ssl.SSLError, OSError, http.client.HTTPException)):
        mesh.direct(mesh.client_context("mallory", ["api"], other_ca), {})
    assert mesh.backends["web"].hits == hits  # none of them got through
    assert mesh.get("web")[0] == 200


def test_a_certificate_for_one_service_cannot_call_as_another(mesh: TlsMesh) -> None:
    ctx = mesh.client_context("batch-1", ["batch"])
    status, hs = mesh.direct(ctx, {"x-rumor-source": "api"})
    assert status == 403 and "does not name service 'api'" in hs["x-rumor-error"]
    status, _ = mesh.direct(ctx, {"x-rumor-source": "batch"})
    assert status == 200
    status, _ = mesh.direct(ctx, {})  # one service in the certificate: that is who calls
    assert status == 200


def test_access_policy_uses_the_certificate_identity(mesh: TlsMesh) -> None:
    mesh.publish("access", "web-access", 'destination = "web"\ndefault = "deny"\n'
                 'allow = ["api"]\n')
    assert mesh.get("web")[0] == 200  # a0's certificate names api
    status, hs = mesh.direct(mesh.client_context("batch-2", ["batch"]), {})
    assert status == 403 and "batch" in hs["x-rumor-error"]
    mesh.publish("access", "web-access", 'destination = "web"\ndefault = "allow"\n')


def test_a_certificate_naming_several_services_is_judged_by_every_name(
        mesh: TlsMesh) -> None:
    """Issue 27 item 3: with deny = ["batch"] (default allow), a certificate naming web
    and batch that sends no source header was "unknown identity" and got in; it is
    denied now, and let in only when it declares web, its name the policy allows."""
    hits = mesh.backends["web"].hits
    mesh.publish("access", "web-access", 'destination = "web"\ndefault = "allow"\n'
                 'deny = ["batch"]\n')
    try:
        two = mesh.client_context("multi-1", ["web", "batch"])
        status, hs = mesh.direct(two, {})
        assert status == 403
        assert 'source "batch" is denied' in hs["x-rumor-error"]
        assert 'names "batch", "web"' in hs["x-rumor-error"]
        assert mesh.backends["web"].hits == hits  # nothing reached the service
        assert mesh.direct(two, {"x-rumor-source": "batch"})[0] == 403
        assert mesh.direct(two, {"x-rumor-source": "web"})[0] == 200
        # A single-name certificate is judged by its one name, as before.
        assert mesh.direct(mesh.client_context("web-9", ["web"]), {})[0] == 200
    finally:
        mesh.publish("access", "web-access", 'destination = "web"\ndefault = "allow"\n')


def test_hostile_handshakes_leave_the_listener_serving(mesh: TlsMesh) -> None:
    for junk in (b"", b"\x16\x03\x01\x00\x05hello", b"GET / HTTP/1.1\r\n\r\n", bytes(4096)):
        with socket.create_connection((HOST, mesh.in_port), timeout=5) as s:
            s.sendall(junk)
            s.settimeout(5)
            with contextlib.suppress(OSError):
                s.recv(100)
    slow = socket.create_connection((HOST, mesh.in_port), timeout=5)  # says nothing
    try:
        assert mesh.get("web")[0] == 200
        assert mesh.direct(mesh.client_context("batch-3", ["batch"]), {})[0] == 200
    finally:
        slow.close()
    a1 = mesh.cluster.agents[1]
    metrics = urllib.request.urlopen(f"http://{a1.api}/metrics", timeout=5).read().decode()
    failures = next(float(line.split()[1]) for line in metrics.splitlines()
                    if line.startswith("rumor_tls_handshake_failures_total"))
    assert failures >= 4


def test_a_renewed_certificate_is_picked_up_without_restart(mesh: TlsMesh) -> None:
    a2 = mesh.cluster.agents[2]
    assert mesh.get("db")[0] != 200
    issue(mesh.ca, "a2", ["other", "db"], 1, mesh.tmp / "a2")  # same files, renewed
    wait_for(lambda: mesh.get("db")[0] == 200, 20, "a2's renewed certificate to be used")
    assert "tls_reloaded" in a2.log.read_text()
