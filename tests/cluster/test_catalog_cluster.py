"""Integration: service discovery across real agents on 127.0.0.1 (API, DNS, Python API,
health checks, blocking queries, failures, big catalogs, bad input)."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import trio
from dnslib import RCODE, DNSRecord

from rumor.gossip.config import LOCAL
from rumor.gossip.discovery import Discovery
from rumor.gossip.node import Node, NodeConfig

from ..agents import Agent, AgentCluster, free_port, rumor_cmd, wait_for

JSON = {"content-type": "application/json"}


class _Health:
    """A tiny HTTP service whose /healthz answers 200 or 500 as the test says."""

    def __init__(self) -> None:
        self.ok = True
        health = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200 if health.ok else 500)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _start(cluster: AgentCluster, extras: list[list[str]]) -> list[Agent]:
    for i, extra in enumerate(extras):
        a = Agent(f"a{i}", cluster.workdir, extra)
        a.start(cluster.agents[0] if cluster.agents else None)
        cluster.agents.append(a)
        if i == 0:
            wait_for(a.members, 20, "the seed's API")
    wait_for(lambda: cluster.converged(len(extras)), 30, "the agents to converge")
    return cluster.agents


def _get(agent: Agent, path: str, timeout: float = 5) -> tuple[Any, dict[str, str]]:
    with urllib.request.urlopen(f"http://{agent.api}{path}", timeout=timeout) as r:
        return json.loads(r.read()), {k.lower(): v for k, v in r.headers.items()}


def _put(agent: Agent, path: str, doc: Any = None) -> tuple[int, Any]:
    req = urllib.request.Request(f"http://{agent.api}{path}", method="PUT", headers=JSON,
                                 data=json.dumps(doc).encode() if doc is not None else b"")
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _nodes(agent: Agent, service: str, query: str = "") -> list[str]:
    try:
        rows, _ = _get(agent, f"/v1/catalog/service/{service}{query}")
    except (OSError, ValueError):
        return []
    return [r["node"] for r in rows]


def _dns(port: int, name: str, qtype: str = "A") -> DNSRecord:
    return DNSRecord.parse(DNSRecord.question(name, qtype).send("127.0.0.1", port, timeout=2))


def test_service_on_a_resolves_on_c_and_follows_its_health(cluster: AgentCluster) -> None:
    web = _Health()
    dns_port = free_port()
    try:
        spec = (f"name=web,port={web.port},version=v2,tags=blue|canary,"
                f"check=http://127.0.0.1:{web.port}/healthz,interval=200ms,timeout=150ms,fall=2")
        a, _b, c = _start(cluster, [["--service", spec], [],
                                    ["--dns", f"127.0.0.1:{dns_port}"]])
        # API on C
        wait_for(lambda: _nodes(c, "web") == ["a0"], 10, "web to resolve on C")
        rows, headers = _get(c, "/v1/catalog/service/web?tag=canary&near=_agent")
        assert rows[0]["port"] == web.port and rows[0]["version"] == "v2"
        assert rows[0]["status"] == "passing" and int(headers["x-rumor-index"]) > 1
        assert _nodes(c, "web", "?tag=green") == [] and _nodes(c, "web", "?version=v1") == []
        services, _ = _get(c, "/v1/catalog/services")
        assert services["web"]["tags"] == ["blue", "canary"]
        # DNS on C
        ans = _dns(dns_port, "web.service.rumor")
        assert [str(r.rdata) for r in ans.rr] == ["127.0.0.1"]
        srv = _dns(dns_port, "canary.web.service.rumor", "SRV")
        assert srv.rr[0].rdata.port == web.port
        assert _dns(dns_port, "nope.service.rumor").header.rcode == RCODE.NXDOMAIN
        # Malformed packets: FORMERR or silence, and the server keeps answering.
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(2)
            s.sendto(b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x07broken", (
                "127.0.0.1", dns_port))
            reply, _ = s.recvfrom(512)
            assert reply[:2] == b"\x12\x34" and reply[3] & 0x0F == RCODE.FORMERR
            for junk in (b"", b"\x00", b"\xff" * 700, bytes(range(256))):
                s.sendto(junk, ("127.0.0.1", dns_port))
        assert _dns(dns_port, "web.service.rumor").rr
        # A failing check removes it within interval × fall (+ timeout) plus gossip time.
        web.ok = False
        took = wait_for(lambda: _nodes(c, "web") == [], 10, "the failing instance to go")
        assert took < 0.2 * 2 + 0.15 + 1.5, took
        assert _nodes(c, "web", "?critical=1") == ["a0"]
        assert _dns(dns_port, "web.service.rumor").header.rcode == RCODE.NXDOMAIN
        web.ok = True
        wait_for(lambda: _nodes(c, "web") == ["a0"], 5, "the passing instance to return")
        # Killing A removes its services once A is failed.
        a.signal(signal.SIGKILL)
        a.wait_exit()
        wait_for(lambda: c.status_of("a0") == "failed", 20, "A to be failed")
        assert _nodes(c, "web", "?critical=1") == []
    finally:
        web.close()


def test_blocking_query_returns_on_change_and_times_out(cluster: AgentCluster) -> None:
    a, c = _start(cluster, [[], []])
    _, h = _get(c, "/v1/catalog/service/api")
    index = int(h["x-rumor-index"])
    t0 = time.monotonic()
    _, h2 = _get(c, f"/v1/catalog/service/api?index={index}&wait=400ms")
    waited = time.monotonic() - t0
    assert 0.35 < waited < 2 and int(h2["x-rumor-index"]) == index
    result: dict[str, Any] = {}

    def block() -> None:
        t = time.monotonic()
        result["rows"], result["headers"] = _get(
            c, f"/v1/catalog/service/api?index={index}&wait=20s", timeout=25)
        result["took"] = time.monotonic() - t

    th = threading.Thread(target=block)
    th.start()
    time.sleep(0.3)
    status, body = _put(a, "/v1/agent/service/register", {"name": "api", "port": 9000,
                                                          "tags": ["x"]})
    assert status == 200 and body["id"] == "api"
    th.join(15)
    assert result["rows"][0]["node"] == "a0" and result["took"] < 5
    assert int(result["headers"]["x-rumor-index"]) > index
    # Deregistration through the API, and the errors of bad registrations.
    assert _put(a, "/v1/agent/service/deregister/api")[0] == 200
    wait_for(lambda: _nodes(c, "api") == [], 5, "the deregistration to spread")
    assert _put(a, "/v1/agent/service/deregister/api")[0] == 404
    code, err = _put(a, "/v1/agent/service/register", {"name": "api", "port": "http"})
    assert code == 400 and "port" in err["error"]
    code, err = _put(a, "/v1/agent/service/register", {"name": "job", "port": 1,
                                                       "check": "ttl", "ttl": "5s"})
    assert code == 200 and err["checks"] == ["job"]
    assert _put(a, "/v1/agent/check/pass/job")[0] == 200
    wait_for(lambda: _nodes(c, "job") == ["a0"], 5, "the TTL-passing service to show")
    assert _put(a, "/v1/agent/check/pass/nope")[0] == 404
    with pytest.raises(urllib.error.HTTPError):
        _get(c, "/v1/catalog/service/api?index=abc")


def test_fifty_services_replicate_and_python_api_watches(cluster: AgentCluster,
                                                        tmp_path: Path) -> None:
    cfg = tmp_path / "services.toml"
    cfg.write_text("".join(
        f'[[service]]\nname = "svc{i:02d}"\nport = {9000 + i}\nversion = "v{i % 3}"\n'
        f'tags = ["tag-a-{i}", "tag-b-{i}", "zone-eu-west-1"]\n\n' for i in range(50)))
    a, _b = _start(cluster, [["--config", str(cfg)], []])

    async def embedded() -> tuple[int, list[str]]:
        cfg = NodeConfig(name="embedded", bind=("127.0.0.1", 0), gossip=LOCAL,
                         profile="local")
        async with Node(cfg) as node, trio.open_nursery() as nursery:
            catalog = Discovery(node.parts.catalog, node.wake)
            nursery.start_soon(catalog.run)
            await node.join([a.addr])
            with trio.fail_after(10):
                while len(catalog.services()) < 50:
                    await trio.sleep(0.05)
            seen: list[str] = []
            with trio.fail_after(10):
                async for change in catalog.watch("late"):
                    seen.append(",".join(i.node for i in change.instances))
                    if len(seen) == 1:
                        _put(a, "/v1/agent/service/register", {"name": "late", "port": 1})
                    else:
                        break
            count = len(catalog.instances("svc07", tag="tag-b-7"))
            await node.leave()
            nursery.cancel_scope.cancel()
            return count, seen

    count, seen = trio.run(embedded)
    assert count == 1 and seen == ["", "a0"]
    wait_for(lambda: len(_get(cluster.agents[1], "/v1/catalog/services")[0]) == 51, 10,
             "51 services on B")


def test_bad_service_specs_exit_2_with_one_line(tmp_path: Path) -> None:
    bad_toml = tmp_path / "bad.toml"
    bad_toml.write_text('[[service]]\nname = "web"\nport = 99999\n')
    for extra, needle in [
        (["--service", "name=web"], "'port' is required"),
        (["--service", "name=web,port=80,check=gopher://x"], "expected http://"),
        (["--config", str(bad_toml)], "port 99999"),
        (["--config", str(tmp_path / "missing.toml")], "no such file or directory"),
        (["--service", "name=web,port=80", "--service", "name=web,port=81"], "twice"),
    ]:
        p = subprocess.run([*rumor_cmd(), "agent", "--name", "x", "--bind",
                            f"127.0.0.1:{free_port()}", *extra],
                           capture_output=True, text=True, timeout=30)
        assert p.returncode == 2, (extra, p.stderr)
        assert needle in p.stderr and p.stderr.count("\n") == 1, p.stderr
