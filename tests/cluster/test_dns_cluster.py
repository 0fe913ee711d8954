"""Integration: a real agent's DNS over UDP and TCP on one port it picks itself (port 0),
holding 50 instances of one service: UDP truncates (TC=1), TCP gets all 50, each SRV
target's address rides in the additional section, TTLs come from the options.

dnslib's client is the CI path; ``dig +tcp`` is tried as well when it is on PATH.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator

import pytest
from dnslib import QTYPE, RCODE, DNSRecord

from ..agents import Agent, AgentCluster, wait_for

N = 50
SERVICE_TTL, NODE_TTL = 7, 11


def _services() -> str:
    """50 instances of web: the even ones at the agent's address, the odd ones at an
    address of their own (so SRV targets of both kinds appear)."""
    out = []
    for i in range(N):
        address = f'address = "127.0.1.{i}"\n' if i % 2 else ""
        out.append(f'[[service]]\nname = "web"\nid = "web-{i}"\nport = {9000 + i}\n{address}')
    return "\n".join(out)


def _dns_port(agent: Agent) -> int | None:
    for line in agent.log.read_text().splitlines():
        if line.startswith("{") and '"event": "dns"' in line:
            ev = json.loads(line)
            assert ev["msg"].startswith(f"DNS on udp+tcp://{ev['dns']}")
            return int(ev["dns"].rsplit(":", 1)[1])
    return None


@pytest.fixture(scope="module")
def dns_agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Agent, int]]:
    workdir = tmp_path_factory.mktemp("dns")
    conf = workdir / "services.toml"
    conf.write_text(_services())
    cluster = AgentCluster(workdir)
    try:
        (agent,) = cluster.start(1, ["--dns", "127.0.0.1:0", "--config", str(conf),
                                     "--dns-service-ttl", str(SERVICE_TTL),
                                     "--dns-node-ttl", str(NODE_TTL)])
        wait_for(lambda: _dns_port(agent) is not None, 10, "the DNS log line")
        port = _dns_port(agent)
        assert port is not None
        yield agent, port
    finally:
        cluster.close()


def _ask(port: int, name: str, qtype: str, *, tcp: bool) -> DNSRecord:
    q = DNSRecord.question(name, qtype)
    return DNSRecord.parse(q.send("127.0.0.1", port, tcp=tcp, timeout=5))


def test_udp_truncates_50_instances_and_tcp_on_the_same_port_answers_all(
        dns_agent: tuple[Agent, int]) -> None:
    _agent, port = dns_agent
    udp = _ask(port, "web.service.rumor", "A", tcp=False)
    assert udp.header.tc == 1 and 0 < len(udp.rr) < N
    tcp = _ask(port, "web.service.rumor", "A", tcp=True)
    assert tcp.header.tc == 0 and len(tcp.rr) == N
    assert {str(r.rdata) for r in tcp.rr} == {"127.0.0.1"} | {
        f"127.0.1.{i}" for i in range(1, N, 2)}
    assert {r.ttl for r in tcp.rr} == {SERVICE_TTL}

    srv = _ask(port, "web.service.rumor", "SRV", tcp=True)
    assert srv.header.tc == 0 and len(srv.rr) == N
    assert sorted(r.rdata.port for r in srv.rr) == list(range(9000, 9000 + N))
    # Every SRV target has its A record in the additional section, and that is the
    # address the target's instances listen on.
    additional = {str(r.rname): str(r.rdata) for r in srv.ar if r.rtype == QTYPE.A}
    where = {r.rdata.port: str(r.rdata.target) for r in srv.rr}
    assert where[9000] == "a0.node.rumor." and additional["a0.node.rumor."] == "127.0.0.1"
    for i in range(1, N, 2):
        assert additional[where[9000 + i]] == f"127.0.1.{i}"
    assert set(additional) == set(where.values())
    assert {r.ttl for r in srv.rr} == {r.ttl for r in srv.ar if r.rtype == QTYPE.A} \
        == {SERVICE_TTL}
    # A target resolves on its own to the same address; node answers carry their TTL.
    odd = _ask(port, where[9001], "A", tcp=False)
    assert [(str(r.rdata), r.ttl) for r in odd.rr] == [("127.0.1.1", NODE_TTL)]
    node = _ask(port, "a0.node.rumor", "A", tcp=True)
    assert [(str(r.rdata), r.ttl) for r in node.rr] == [("127.0.0.1", NODE_TTL)]
    assert _ask(port, "nope.service.rumor", "A", tcp=True).header.rcode == RCODE.NXDOMAIN


def test_dig_over_tcp_gets_every_instance(dns_agent: tuple[Agent, int]) -> None:
    dig = shutil.which("dig")
    if dig is None:
        print("dig is not on PATH (Debian: dnsutils); dnslib's client covered TCP")
        pytest.skip("dig is not on PATH (Debian: dnsutils)")
    _agent, port = dns_agent

    def run(*args: str) -> str:
        res = subprocess.run([dig, "@127.0.0.1", "-p", str(port), *args], timeout=20,
                             capture_output=True, text=True, check=True)
        return res.stdout

    over_tcp = run("+tcp", "+short", "web.service.rumor", "SRV").split("\n")
    assert len([line for line in over_tcp if line]) == N
    # Over UDP without dig's own TCP retry, the truncation is visible.
    over_udp = run("+notcp", "+ignore", "web.service.rumor", "SRV")
    assert ";; flags: qr aa tc rd;" in over_udp

