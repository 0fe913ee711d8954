"""Integration: the sidecar data plane across 3 real agents and real backends.

a0 is the caller (outbound listener, calling as ``api``); a1 serves ``web`` v1 from two
backends, a2 serves ``web`` v2 (tag ``canary``) from one, both behind inbound
listeners. Policies are signed here and published through a0's API.
"""

from __future__ import annotations

import http.client
import json
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from rumor.policy.envelope import make_payload, sign
from rumor.policy.examples import canary_route
from rumor.policy.keys import SecretKey

from ..agents import Agent, AgentCluster, wait_for
from ..backends import Backend
from ..ports import free_port

HOST = "127.0.0.1"


class Mesh:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.key = SecretKey.generate()
        pub = tmp / "ops.pub"
        pub.write_text(self.key.public.line() + "\n")
        self.backends = {n: Backend(n) for n in ("b1", "b2", "b3")}
        self.cluster = AgentCluster(tmp)
        self.out_port = free_port()
        self.version = 0
        b = self.backends
        common = ["--trust-key", str(pub)]
        specs = [
            ["--outbound", f"{HOST}:{self.out_port}", "--identity", "api",
             "--access-log", str(tmp / "access.log")],
            ["--inbound", f"{HOST}:{free_port()}",
             "--service", f"name=web,id=web-1,port={b['b1'].port},version=v1",
             "--service", f"name=web,id=web-2,port={b['b2'].port},version=v1"],
            ["--inbound", f"{HOST}:{free_port()}",
             "--service", f"name=web,id=web-3,port={b['b3'].port},version=v2,tags=canary"],
        ]
        for i, extra in enumerate(specs):
            a = Agent(f"a{i}", tmp, [*common, *extra])
            a.start(self.cluster.agents[0] if self.cluster.agents else None)
            self.cluster.agents.append(a)
            if i == 0:
                wait_for(a.members, 20, "the seed's API")
        wait_for(lambda: self.cluster.converged(3), 30, "3 agents to converge")
        wait_for(lambda: len(self.get_all(40)) == 3, 20, "every backend reachable")

    @property
    def caller(self) -> Agent:
        return self.cluster.agents[0]

    def publish(self, kind: str, name: str, body: str) -> None:
        self.version += 1
        text = f'kind = "{kind}"\nname = "{name}"\nversion = {self.version}\n{body}'
        data = sign(make_payload(kind, name, self.version, time.time(), None, text.encode()),
                    [self.key]).encode()
        req = urllib.request.Request(f"http://{self.caller.api}/v1/policies", data=data,
                                     method="PUT",
                                     headers={"content-type": "application/x-rumor-envelope"})
        with urllib.request.urlopen(req, timeout=5) as r:
            assert json.loads(r.read())["status"] == "accepted"
        v = self.version
        wait_for(lambda: all(self._holds(a, name, v) for a in self.cluster.agents), 10,
                 f"{name} v{v} everywhere")

    @staticmethod
    def _holds(a: Agent, name: str, version: int) -> bool:
        docs = {d["name"]: d["version"] for d in a.get("/v1/policies")["documents"]}
        return docs.get(name) == version

    def conn(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(HOST, self.out_port, timeout=10)

    def get(self, path: str = "/", headers: dict[str, str] | None = None,
            conn: http.client.HTTPConnection | None = None,
            method: str = "GET") -> tuple[int, dict[str, str], bytes]:
        c = conn or self.conn()
        c.request(method, path, headers={"host": "web", **(headers or {})})
        r = c.getresponse()
        body = r.read()
        if conn is None:
            c.close()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, body

    def get_all(self, n: int, headers: dict[str, str] | None = None) -> Counter[str]:
        c = self.conn()
        seen: Counter[str] = Counter()
        for _ in range(n):
            status, hs, _ = self.get("/", headers, conn=c)
            seen[hs.get("x-backend", str(status))] += 1
        c.close()
        return seen

    def get_until(self, done: Callable[[], bool], limit: int) -> Counter[str]:
        """Requests one by one until ``done()`` (at most ``limit``)."""
        c = self.conn()
        seen: Counter[str] = Counter()
        for _ in range(limit):
            status, hs, _ = self.get("/", conn=c)
            seen[hs.get("x-backend", str(status))] += 1
            if done():
                break
        c.close()
        return seen

    def close(self) -> None:
        self.cluster.close()
        for b in self.backends.values():
            b.close()


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    m = Mesh(tmp_path_factory.mktemp("mesh"))
    try:
        yield m
    finally:
        m.close()


@pytest.fixture(autouse=True)
def _healthy(mesh: Mesh) -> None:
    for b in mesh.backends.values():
        b.reset()


def test_routing_by_host_and_proxy_form(mesh: Mesh) -> None:
    status, hs, body = mesh.get("/hello?x=1")
    assert status == 200 and body.split()[2] == b"/hello?x=1"
    assert hs["x-backend"] in mesh.backends
    # Absolute-form, as an application with HTTP_PROXY sends it.
    c = mesh.conn()
    c.request("GET", "http://web.service.rumor/p", headers={"host": "web.service.rumor"})
    r = c.getresponse()
    assert r.status == 200 and r.read().split()[2] == b"/p"
    # The backend saw forwarding and tracing headers, and no mesh headers.
    seen = mesh.backends[r.getheader("x-backend") or "b1"].last_headers
    assert seen["x-forwarded-for"].startswith("127.0.0.1")
    assert seen["traceparent"].startswith("00-") and "x-rumor-source" not in seen
    # An unknown service is a fast 503 that says why.
    c.request("GET", "/", headers={"host": "nope"})
    r = c.getresponse()
    r.read()
    assert r.status == 503 and "unknown service" in (r.getheader("x-rumor-error") or "")
    c.close()
    # A client's traceparent keeps its trace id.
    trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    mesh.get("/", {"traceparent": f"00-{trace}-00f067aa0ba902b7-01"})
    assert any(trace in b.last_headers.get("traceparent", "") for b in mesh.backends.values())


def test_weighted_split_and_header_canary(mesh: Mesh) -> None:
    mesh.publish("route", "web-routes", canary_route("web", canary_version=None,
                                                     canary_tags=("canary",), header=False))
    n = 1000
    seen = mesh.get_all(n)
    canary = seen["b3"]
    # Binomial(1000, 0.1): sd 9.5; allow 4 sd.
    assert abs(canary - 100) <= 38, seen
    assert seen["b1"] + seen["b2"] + canary == n
    assert mesh.get_all(50, {"X-Canary": "1"}) == Counter({"b3": 50})


def test_retry_succeeds_and_budget_caps_outage(mesh: Mesh) -> None:
    mesh.publish("route", "web-routes", 'service = "web"\n')  # back to all instances
    mesh.publish("resilience", "web-resilience", """service = "web"
[retries]
attempts = 3
on = ["connect-failure", "503"]
backoff = "1ms"
max_backoff = "2ms"
[retries.budget]
ratio = 0.2
min_per_second = 1
window = "10s"
[outlier_ejection]
enabled = false
""")
    mesh.backends["b1"].status = 503
    # The others turn slow, so the balancer soon tries the (fast-failing) b1.
    mesh.backends["b2"].delay = mesh.backends["b3"].delay = 0.1
    seen = mesh.get_until(lambda: mesh.backends["b1"].hits > 0, 60)
    assert seen["503"] == 0 and seen["b1"] == 0, seen  # every b1 answer was retried
    assert mesh.backends["b1"].hits > 0
    # Full outage: every backend fails; retries stay within the budget.
    for b in mesh.backends.values():
        b.reset()
        b.status = 503
    n = 200
    seen = mesh.get_all(n)
    assert seen == Counter({"b1": seen["b1"], "b2": seen["b2"], "b3": seen["b3"]})
    hits = sum(b.hits for b in mesh.backends.values())
    retries = hits - n
    # 20% of the requests in the window plus the floor (1/s over 10 s), and the
    # 60 requests of the first half of this test are still in the window.
    assert retries <= 0.2 * (n + 60) + 10 + 2, (hits, n)
    metrics = urllib.request.urlopen(f"http://{mesh.caller.api}/metrics", timeout=5).read()
    assert b"rumor_proxy_retry_budget_exhausted_total" in metrics


@pytest.mark.alone
def test_timeouts(mesh: Mesh) -> None:
    mesh.publish("resilience", "web-resilience", """service = "web"
[timeouts]
per_try = "200ms"
overall = "500ms"
[retries]
attempts = 5
on = ["504"]
backoff = "1ms"
max_backoff = "1ms"
[outlier_ejection]
enabled = false
""")
    for b in mesh.backends.values():
        b.delay = 2.0
    t0 = time.monotonic()
    status, hs, _ = mesh.get("/slow")
    took = time.monotonic() - t0
    assert status == 504 and 0.4 <= took < 1.2, (status, took, hs)
    assert "timeout" in hs["x-rumor-error"] or "no response" in hs["x-rumor-error"]


@pytest.mark.alone
def test_circuit_breaker_fails_fast(mesh: Mesh) -> None:
    import threading
    mesh.publish("resilience", "web-resilience", """service = "web"
[timeouts]
per_try = "5s"
[circuit_breaker]
max_requests = 2
[outlier_ejection]
enabled = false
""")
    for b in mesh.backends.values():
        b.delay = 1.0
    results: list[int] = []
    threads = [threading.Thread(target=lambda: results.append(mesh.get("/hold")[0]))
               for _ in range(2)]
    for t in threads:
        t.start()
    time.sleep(0.3)
    t0 = time.monotonic()
    status, hs, _ = mesh.get("/third")
    assert status == 503 and time.monotonic() - t0 < 0.2
    assert "circuit breaker" in hs["x-rumor-error"]
    for t in threads:
        t.join()
    assert results == [200, 200]


def test_circuit_breaker_bounds_requests_waiting_for_a_connection(mesh: Mesh) -> None:
    import threading
    mesh.publish("resilience", "web-resilience", """service = "web"
[timeouts]
per_try = "5s"
[retries]
attempts = 1
[circuit_breaker]
max_requests = 100
max_pending = 0
[outlier_ejection]
enabled = false
""")
    for b in mesh.backends.values():
        b.delay = 0.5
    results: list[tuple[int, str]] = []

    def call() -> None:
        status, hs, _ = mesh.get("/many")
        results.append((status, hs.get("x-rumor-error", "")))
    threads = [threading.Thread(target=call) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # Tries that found an idle pooled connection went through; with max_pending 0 no
    # try may wait for a new one, so the rest failed fast.
    refused = [err for status, err in results if status == 503]
    assert refused and all("waiting for a connection" in err for err in refused)
    assert {status for status, _ in results} <= {200, 503}


def test_outlier_ejected_and_readmitted(mesh: Mesh) -> None:
    # The balancer already shuns an instance after one fast failure (a failure counts
    # as a slow response), so ejection is checked with a hair trigger.
    mesh.publish("resilience", "web-resilience", """service = "web"
[retries]
attempts = 1
[outlier_ejection]
consecutive_failures = 1
base_ejection_time = "3s"
max_ejected_percent = 50
""")
    mesh.publish("route", "web-routes", 'service = "web"\n')  # all instances
    # The others turn slow, so the balancer tries the (fast-failing) b2.
    mesh.backends["b1"].delay = mesh.backends["b3"].delay = 0.1
    mesh.backends["b2"].status = 500
    seen = mesh.get_until(lambda: mesh.backends["b2"].hits > 0, 60)
    mesh.backends["b1"].delay = mesh.backends["b3"].delay = 0.02
    hits = mesh.backends["b2"].hits
    assert 1 <= hits <= 3 and seen["b2"] == hits, (hits, seen)  # its 500s reached us
    log = mesh.caller.log
    wait_for(lambda: '"event": "ejected"' in log.read_text(), 5, "the ejection log line")
    mesh.get_all(20)
    assert mesh.backends["b2"].hits == hits  # out while ejected
    mesh.backends["b2"].status = 200
    time.sleep(3.1)
    seen = mesh.get_all(50)
    assert seen["b2"] > 0, seen  # readmitted, with a fresh latency estimate
    assert '"event": "readmitted"' in log.read_text()
    metrics = urllib.request.urlopen(f"http://{mesh.caller.api}/metrics", timeout=5).read()
    assert b'rumor_proxy_ejections_total{instance="a1/web-2",service="web"}' in metrics


def test_access_denied_gets_403(mesh: Mesh) -> None:
    mesh.publish("access", "web-access", """destination = "web"
default = "deny"
allow = ["frontend"]
""")
    status, hs, _ = mesh.get("/")
    assert status == 403 and "not allowed" in hs["x-rumor-error"]
    # An application cannot claim another identity: its header is replaced.
    status, _, _ = mesh.get("/", {"x-rumor-source": "frontend"})
    assert status == 403
    mesh.publish("access", "web-access", """destination = "web"
default = "deny"
allow = ["api"]
""")
    assert mesh.get("/")[0] == 200


def test_large_streaming_body_bounded_memory(mesh: Mesh) -> None:
    size = 200 * 1024 * 1024
    chunk = b"x" * (1 << 20)

    def rss(a: Agent) -> int:
        assert a.proc is not None
        with open(f"/proc/{a.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise AssertionError(f"no VmRSS in /proc/{a.proc.pid}/status: cannot bound memory")

    before = [rss(a) for a in mesh.cluster.agents]
    c = mesh.conn()
    c.putrequest("PUT", "/upload", skip_host=True)
    c.putheader("host", "web")
    c.putheader("content-length", str(size))
    c.endheaders()
    for _ in range(size // len(chunk)):
        c.send(chunk)
    r = c.getresponse()
    body = r.read()
    assert r.status == 200 and body.split()[3] == str(size).encode()
    after = [rss(a) for a in mesh.cluster.agents]
    grew = max(b2 - b1 for b1, b2 in zip(before, after, strict=True))
    assert grew < 32 * 1024 * 1024, (before, after)


def test_access_log_lines(mesh: Mesh) -> None:
    mesh.get("/logged")

    def logged() -> list[dict[str, object]]:
        lines = [json.loads(x) for x in (mesh.tmp / "access.log").read_text().splitlines()]
        return [x for x in lines if x["path"] == "/logged"]
    # The line is written once the last byte is out, just after the client has it.
    wait_for(logged, 5, "the access log line")
    last = logged()[-1]
    assert last["listener"] == "outbound" and last["service"] == "web"
    assert last["status"] == 200 and len(last["trace_id"]) == 32


def test_hostile_http_leaves_the_sidecar_serving(mesh: Mesh) -> None:
    import socket

    def raw(data: bytes) -> bytes:
        s = socket.create_connection((HOST, mesh.out_port), timeout=5)
        s.sendall(data)
        out = b""
        try:
            while True:
                got = s.recv(65536)
                if not got:
                    break
                out += got
        except TimeoutError:
            pass
        s.close()
        return out

    too_large = raw(b"GET / HTTP/1.1\r\nhost: web\r\nx: " + b"a" * 40000 + b"\r\n\r\n")
    assert too_large[:12] == b"HTTP/1.1 431"
    assert b"x-rumor-error-code: headers_too_large" in too_large
    assert raw(b"POST / HTTP/1.1\r\nhost: web\r\ncontent-length: 5\r\n"
               b"transfer-encoding: chunked\r\n\r\n0\r\n\r\n")[:12] == b"HTTP/1.1 400"
    assert raw(b"POST / HTTP/1.1\r\nhost: web\r\ntransfer-encoding: chunked\r\n\r\n"
               b"zz\r\nhello\r\n0\r\n\r\n")[:12] == b"HTTP/1.1 400"
    garbage = raw(b"GARBAGE\r\n\r\n")
    assert garbage[:12] == b"HTTP/1.1 400"
    assert b"x-rumor-error-code: bad_request" in garbage
    # Still serving. (Whichever of this module's access policies is in force allows the
    # caller: none, or test_access_policy's last, which allows "api".)
    assert mesh.get("/")[0] == 200
