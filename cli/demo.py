"""``rumor demo``: a live 5-agent cluster on loopback, narrated.

It starts real ``rumor agent`` processes (the fast ``local`` profile), waits for them
to converge, kills one with SIGKILL and shows the others suspect it and then declare it
failed, restarts it under the same name and shows it rejoin with a higher incarnation,
then stops every agent gracefully. Before the failure it registers a service with an
HTTP health check on one agent, shows every agent discover it, and shows a failing
check drop the instance everywhere (and a passing one bring it back), and publishes a
signed policy document through one agent: every agent holds it, a forged one is
refused, and the restarted agent gets it back on rejoin. Everything it starts, it
stops, even on Ctrl-C.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from ..policy.examples import canary_route
from .client import ApiError, get_json, put_json
from .ports import free_port
from .span_sink import SpanSink

HOST = "127.0.0.1"


class DemoAgent:
    def __init__(self, name: str, logdir: Path, trust_key: Path, *,
                 outbound: bool = False, security: list[str] | None = None,
                 otlp: str | None = None) -> None:
        self.name = name
        self.otlp = otlp
        self.trust_key = trust_key
        #: --keyring and --tls-* flags: encrypted gossip, mutual TLS between sidecars.
        self.security = security or []
        self.port = free_port()
        self.api = f"{HOST}:{free_port()}"
        self.inbound = free_port()
        self.outbound = free_port() if outbound else None
        #: The caller's local port for the TCP service ``kv`` (--upstream).
        self.upstream = free_port() if outbound else None
        self.log_path = logdir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, seed: DemoAgent | None) -> None:
        argv = [sys.executable, "-m", "rumor.cli", "agent", "--name", self.name,
                "--bind", f"{HOST}:{self.port}", "--api", self.api, "--profile", "local",
                "--log-format", "json", "--tag", "role=demo",
                "--trust-key", str(self.trust_key), "--inbound", f"{HOST}:{self.inbound}",
                *self.security]
        if self.outbound is not None:
            argv += ["--outbound", f"{HOST}:{self.outbound}", "--identity", "frontend",
                     "--upstream", f"kv={HOST}:{self.upstream}"]
        if self.otlp is not None:
            argv += ["--otlp", self.otlp]
        if seed is not None:
            argv += ["--join", f"{HOST}:{seed.port}"]
        with open(self.log_path, "ab") as logf:
            self.proc = subprocess.Popen(argv, stdout=logf, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)

    def members(self) -> dict[str, dict[str, Any]]:
        try:
            return {m["name"]: m for m in get_json(self.api, "/v1/members", timeout=1.0)}
        except ApiError:
            return {}

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class _HealthEndpoint:
    """The demo's "service": /healthz answers 200 or 500 as the demo says."""

    def __init__(self) -> None:
        self.ok = True
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200 if outer.ok else 500)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass  # the demo narrates; request lines would drown it

        self.server = ThreadingHTTPServer((HOST, 0), Handler)
        self.port = int(self.server.server_address[1])
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _instances(agent: DemoAgent, service: str) -> list[dict[str, Any]]:
    try:
        rows: list[dict[str, Any]] = get_json(agent.api, f"/v1/catalog/service/{service}",
                                              timeout=1.0)
    except ApiError:
        return []
    return rows


def _discovery(cluster: list[DemoAgent]) -> None:
    """Step 2: register a checked service on one agent, find it on all, fail its check."""
    owner, reader = cluster[1], cluster[0]
    health = _HealthEndpoint()
    try:
        spec = {"name": "web", "port": health.port, "version": "v2", "tags": ["canary"],
                "check": f"http://{HOST}:{health.port}/healthz", "interval": "200ms",
                "timeout": "150ms", "fall": 2}
        _say(f"\n2. Service discovery: {owner.name} registers `web` (HTTP check every "
             f"200 ms, critical after 2 failures) through its API")
        put_json(owner.api, "/v1/agent/service/register", spec, timeout=2.0)
        took = _wait("web on every agent", lambda: all(
            _instances(a, "web") for a in cluster), 10)
        _say(f"   every agent resolves web after {took:.2f} s; from {reader.name}:")
        for r in _instances(reader, "web"):
            _say(f"    web  {r['node']:<8} {r['address']}:{r['port']}  {r['status']}  "
                 f"version={r['version']} tags={','.join(r['tags'])}")
        health.ok = False
        took = _wait("the failing instance to be dropped", lambda: all(
            not _instances(a, "web") for a in cluster), 10)
        _say(f"   /healthz now answers 500: web dropped from every agent after {took:.2f} s")
        health.ok = True
        took = _wait("the instance to return", lambda: all(
            _instances(a, "web") for a in cluster), 10)
        _say(f"   /healthz answers 200 again: web back everywhere after {took:.2f} s")
        put_json(owner.api, "/v1/agent/service/deregister/web", {}, timeout=2.0)
    finally:
        health.close()


DEMO_POLICY = """kind = "access"
name = "web-access"
version = 1
description = "only the api service may call web"
destination = "web"
default = "deny"
allow = ["api"]
"""


def _held(agent: DemoAgent) -> dict[str, int]:
    try:
        doc = get_json(agent.api, "/v1/policies", timeout=1.0)
    except ApiError:
        return {}
    return {d["name"]: d["version"] for d in doc["documents"]}


def _policy(cluster: list[DemoAgent], keydir: Path) -> None:
    """Step 3: publish a signed document through one agent; refuse a forged one."""
    from ..policy.envelope import make_payload, sign
    from ..policy.keys import SecretKey, load_secret_key
    from .client import put_bytes
    via = cluster[2]
    key = load_secret_key(keydir / "ops.key")
    _say(f"\n3. Signed policy: the operator signs `web-access` (only `api` may call `web`) "
         f"with key {key.public.id} and publishes it through {via.name}")
    data = sign(make_payload("access", "web-access", 1, time.time(), None,
                             DEMO_POLICY.encode()), [key]).encode()
    put_bytes(via.api, "/v1/policies", data, "application/x-rumor-envelope", timeout=2.0)
    took = _wait("the policy on every agent", lambda: all(
        _held(a).get("web-access") == 1 for a in cluster), 10)
    _say(f"   every agent holds web-access v1 after {took:.2f} s (verified against its "
         "--trust-key, stored, re-gossiped)")
    verdict = get_json(cluster[0].api, "/v1/evaluate/web?source=batch", timeout=2.0)
    _say(f"   {cluster[0].name} evaluates a call batch -> web: {verdict['access']['reason']}")
    forged = sign(make_payload("access", "web-access", 2, time.time(), None,
                               DEMO_POLICY.replace('"api"', '"batch"')
                               .replace("version = 1", "version = 2").encode()),
                  [SecretKey.generate()]).encode()
    try:
        put_bytes(cluster[1].api, "/v1/policies", forged, "application/x-rumor-envelope",
                  timeout=2.0)
        _say("   (unexpected: the forged document was accepted)")
    except ApiError as e:
        _say(f"   a version 2 signed by an unknown key is refused by {cluster[1].name}: "
             f"{e.message.split(': ', 2)[-1]}")
    time.sleep(0.5)
    _say("   and it went nowhere: every agent still holds "
         + ", ".join(f"{a.name}=v{_held(a).get('web-access')}" for a in cluster))


class _ShopBackend:
    """A demo instance of `shop`: answers with its name after ``delay`` seconds."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.delay = 0.0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def do_GET(self) -> None:
                if outer.delay:
                    time.sleep(outer.delay)
                body = f"{outer.name}\n".encode()
                self.send_response(200)
                self.send_header("x-backend", outer.name)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer((HOST, 0), Handler)
        self.server.daemon_threads = True
        self.port = int(self.server.server_address[1])
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


SHOP_ROUTE = canary_route("shop")


def _send_through(port: int, n: int, headers: dict[str, str] | None = None,
                  seconds: float | None = None) -> tuple[dict[str, int], list[float]]:
    """Requests to `shop` through a sidecar's outbound listener: counts per backend and
    latencies (n requests, or as many as fit in `seconds`)."""
    conn = http.client.HTTPConnection(HOST, port, timeout=10)
    counts: dict[str, int] = {}
    lat: list[float] = []
    end = time.monotonic() + seconds if seconds else None
    try:
        while (len(lat) < n) if end is None else (time.monotonic() < end):
            t0 = time.monotonic()
            conn.request("GET", "/", headers={"host": "shop", **(headers or {})})
            r = conn.getresponse()
            r.read()
            lat.append(time.monotonic() - t0)
            code = r.getheader("x-rumor-error-code")
            who = r.getheader("x-backend") or f"HTTP {r.status}" + (f" {code}" if code else "")
            counts[who] = counts.get(who, 0) + 1
    finally:
        conn.close()
    return counts, lat


def _shares(counts: dict[str, int]) -> str:
    total = sum(counts.values()) or 1
    return ", ".join(f"{k} {v} ({100 * v / total:.1f}%)" for k, v in sorted(counts.items()))


def _mesh(cluster: list[DemoAgent], keydir: Path, sink: SpanSink) -> None:
    """Step 4: traffic through sidecars, a signed canary split, a slowed instance."""
    from ..policy.envelope import make_payload, sign
    from ..policy.keys import load_secret_key
    from .client import put_bytes
    caller = cluster[0]
    assert caller.outbound is not None
    backends = [_ShopBackend(n) for n in ("shop-a", "shop-b", "shop-c")]
    try:
        _say(f"\n4. Service mesh: `shop` v1 runs on {cluster[1].name} and {cluster[2].name}, "
             f"v2 on {cluster[3].name}, each behind its agent's inbound listener; "
             f"{caller.name}'s outbound listener takes the application's requests")
        for agent, b, version in zip(cluster[1:4], backends, ("v1", "v1", "v2"), strict=True):
            put_json(agent.api, "/v1/agent/service/register",
                     {"name": "shop", "id": b.name, "port": b.port, "version": version},
                     timeout=2.0)
        _wait("shop on the caller", lambda: len(_instances(caller, "shop")) == 3, 10)
        counts, lat = _send_through(caller.outbound, 300)
        lat.sort()
        _say(f"   300 requests with Host: shop, no policy: {_shares(counts)}; "
             f"p50 {lat[len(lat) // 2] * 1000:.2f} ms through two sidecars")
        key = load_secret_key(keydir / "ops.key")
        put_bytes(caller.api, "/v1/policies", sign(make_payload(
            "route", "shop-canary", 1, time.time(), None, SHOP_ROUTE.encode()), [key]).encode(),
            "application/x-rumor-envelope", timeout=2.0)
        _wait("the route on the caller", lambda: _held(caller).get("shop-canary") == 1, 10)
        counts, _ = _send_through(caller.outbound, 500)
        canary = counts.get("shop-c", 0)
        _say(f"   signed route `shop-canary` (v1 90%, v2 10%) published: 500 requests -> "
             f"{_shares(counts)}; canary share {100 * canary / 500:.1f}%")
        counts, _ = _send_through(caller.outbound, 20, {"x-canary": "1"})
        _say(f"   with header x-canary: 1 -> {_shares(counts)}")
        backends[0].delay = 0.05
        _send_through(caller.outbound, 0, seconds=1.0)  # the balancer notices
        counts, lat = _send_through(caller.outbound, 0, seconds=3.0)
        lat.sort()
        stable = {k: v for k, v in counts.items() if k != "shop-c"}
        _say(f"   shop-a now answers 50 ms late; over the next 3 s the stable share goes "
             f"{_shares(stable)}; p50 {lat[len(lat) // 2] * 1000:.2f} ms, p99 "
             f"{lat[int(len(lat) * 0.99)] * 1000:.2f} ms (p2c over peak-EWMA latency)")
        backends[0].delay = 0.0
        _fault(caller, key)
        _golden(cluster[2])
        _trace(caller, sink)
        for agent, b in zip(cluster[1:4], backends, strict=True):
            put_json(agent.api, f"/v1/agent/service/deregister/{b.name}", {}, timeout=2.0)
    finally:
        for b in backends:
            b.close()


class _GreetingServer:
    """A TCP service that speaks first (as PostgreSQL, SMTP or Redis's AUTH-less banner
    do), then answers each line upper-cased, and closes when the client half-closes."""

    def __init__(self, name: str) -> None:
        import socket
        import threading
        self.name = name
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
            threading.Thread(target=self._talk, args=(conn,), daemon=True).start()

    def _talk(self, conn: Any) -> None:
        with conn:
            try:
                conn.sendall(f"kv ready ({self.name})\n".encode())
                while data := conn.recv(65536):
                    conn.sendall(data.upper())
            except OSError:
                pass

    def close(self) -> None:
        self.sock.close()


def _tcp_round(port: int) -> tuple[str, str, float]:
    """One connection through the caller's upstream port: (the greeting, heard before
    sending anything; the answer after a half-close; seconds to the greeting)."""
    import socket
    t0 = time.monotonic()
    with socket.create_connection((HOST, port), timeout=5) as s:
        f = s.makefile("rb")
        greeting = f.readline().decode().strip()
        took = time.monotonic() - t0
        s.sendall(b"get colour\n")
        s.shutdown(socket.SHUT_WR)  # half-close: the answer still comes back
        answer = f.read().decode().strip()
    return greeting, answer, took


def _tcp_service(cluster: list[DemoAgent]) -> None:
    """Step 4, TCP: a server-speaks-first service declared protocol=tcp, reached through
    a local upstream port, over the same mutual TLS, balanced per connection."""
    caller = cluster[0]
    assert caller.upstream is not None
    servers = [_GreetingServer(n) for n in ("kv-1", "kv-2")]
    try:
        for agent, srv in zip(cluster[1:3], servers, strict=True):
            put_json(agent.api, "/v1/agent/service/register",
                     {"name": "kv", "id": srv.name, "port": srv.port, "protocol": "tcp"},
                     timeout=2.0)
        _wait("kv on the caller", lambda: len(_instances(caller, "kv")) == 2, 10)
        _say(f"   TCP: `kv` (protocol=tcp, it speaks first) on {cluster[1].name} and "
             f"{cluster[2].name}; {caller.name} reaches it at {HOST}:{caller.upstream} "
             "(--upstream kv=...), nothing guessed")
        seen: dict[str, int] = {}
        greeting = answer = ""
        waits: list[float] = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and (len(seen) < 2 or sum(seen.values()) < 20):
            try:
                greeting, answer, took = _tcp_round(caller.upstream)
            except OSError:
                time.sleep(0.2)  # the instances are not routable yet
                continue
            who = greeting.rsplit("(", 1)[-1].rstrip(")")
            seen[who] = seen.get(who, 0) + 1
            waits.append(took)
        if not seen:
            raise TimeoutError("no TCP connection through the upstream port")
        waits.sort()
        _say(f"   {sum(seen.values())} connections, each over mutual TLS between the "
             f"sidecars: {_shares(seen)}; the greeting {greeting!r} arrived "
             f"{waits[len(waits) // 2] * 1000:.1f} ms (median) after connect, before the "
             f"client sent a byte; after a half-close the answer still came: {answer!r}")
        for agent, srv in zip(cluster[1:3], servers, strict=True):
            put_json(agent.api, f"/v1/agent/service/deregister/{srv.name}", {}, timeout=2.0)
    finally:
        for srv in servers:
            srv.close()


SHOP_FAULT = """kind = "fault"
name = "shop-game-day"
version = 1
expires = {expires}
service = "shop"
[[rule]]
name = "flaky"
delay = {{ duration = "50ms", percent = 10.0 }}
abort = {{ status = 503, percent = 10.0 }}
"""


def _fault(caller: DemoAgent, key: Any) -> None:
    """Step 4, last: a signed fault document (it must expire within 24 h): the caller's
    sidecar delays and aborts a share of `shop` requests, and says it was the mesh."""
    from ..policy.envelope import make_payload, sign
    from .client import put_bytes
    assert caller.outbound is not None
    now = time.time()
    text = SHOP_FAULT.format(expires=time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                   time.gmtime(now + 600)))
    put_bytes(caller.api, "/v1/policies", sign(make_payload(
        "fault", "shop-game-day", 1, now, now + 600, text.encode()), [key]).encode(),
        "application/x-rumor-envelope", timeout=2.0)
    _wait("the fault on the caller", lambda: _held(caller).get("shop-game-day") == 1, 10)
    counts, lat = _send_through(caller.outbound, 200)
    slow = sum(1 for t in lat if t >= 0.05)
    _say(f"   fault `shop-game-day` (10% +50 ms, 10% aborted, expires in 10 min): 200 "
         f"requests -> {_shares(counts)}; {slow} took 50 ms or more. An injected abort is "
         "never retried and says so: x-rumor-error-code: fault_abort")


def _golden(asker: DemoAgent) -> None:
    """Step 4, end: the whole mesh's golden metrics, from an agent that served none of
    the calls (a cluster-wide query; counts added, latency sketches merged)."""
    from .stat_cmd import render_stat
    end = (int(time.time()) // 5 + 1) * 5  # wait for the current 5 s bucket to close
    time.sleep(max(0.0, end + 0.3 - time.time()))
    doc = get_json(asker.api, f"/v1/stat?by=instance&listener=outbound&all=1&window=60s"
                   f"&end={end}", timeout=10)
    _say(f"   `rumor stat --all --by instance --listener outbound` on {asker.name} (the "
         "mesh's golden metrics, gathered by a cluster-wide query):")
    for line in render_stat(doc).splitlines():
        _say("     " + line)


def _trace(caller: DemoAgent, sink: SpanSink) -> None:
    """Step 4, last: one request's trace, as the sidecars exported it over OTLP."""
    assert caller.outbound is not None
    trace, app_span = os.urandom(16).hex(), os.urandom(8).hex()
    _send_through(caller.outbound, 1, {"traceparent": f"00-{trace}-{app_span}-01"})
    _wait("the request's spans", lambda: len(sink.of_trace(bytes.fromhex(trace))) >= 2, 10)
    spans = sorted(sink.of_trace(bytes.fromhex(trace)), key=lambda p: p[1].kind, reverse=True)
    _say(f"   one request's trace {trace[:8]}…, as each sidecar exported it (OTLP/HTTP to "
         f"the demo's collector, {sink.received} spans received so far):")
    ids = {app_span: "the application's span"}
    for service, s in spans:
        attrs = {a.key: a.value for a in s.attributes}
        kind = "client" if s.kind == s.SPAN_KIND_CLIENT else "server"
        ids[s.span_id.hex()] = f"{service}'s {kind} span"
        inst = attrs["rumor.instance"].string_value if "rumor.instance" in attrs else "?"
        _say(f"     {service:<9} {kind} span {s.name} {attrs['url.path'].string_value} -> "
             f"{attrs['http.response.status_code'].int_value} ({inst}), "
             f"{(s.end_time_unix_nano - s.start_time_unix_nano) / 1e6:.2f} ms, parent: "
             f"{ids.get(s.parent_span_id.hex(), s.parent_span_id.hex())}")


def _explain(asker: DemoAgent, victim: str) -> None:
    """Step 5, end: the story of the suspicion, merged from every agent's history."""
    doc = get_json(asker.api, f"/v1/explain/{victim}?since=2m", timeout=10)
    st = doc["story"]
    ep = st["episodes"][0] if st["episodes"] else None
    if ep is None or ep["suspected_at"] is None:
        return
    t0 = ep["suspected_at"]
    probes = " and ".join(p["kind"].removeprefix("probe_").replace("_", " ")
                          for p in ep["missed_probes"]) or "no"
    conf = ", ".join(f"{c['agent']} (+{c['at'] - t0:.2f} s)" for c in ep["confirmers"])
    decl = ep["declared"][0] if ep["declared"] else None
    _say(f"   `rumor explain {victim}` on {asker.name}: first suspected by "
         f"{ep['first_suspecter']} after its probe {probes}; "
         + (f"confirmed by {conf}; " if conf else "no independent confirmation; ")
         + (f"declared failed by {decl['agent']} +{decl['at'] - t0:.2f} s later"
            if decl else "not declared failed"))


def _wait(what: str, cond: Callable[[], bool], timeout: float) -> float:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)
    return time.monotonic() - t0


def _say(text: str) -> None:
    print(text, flush=True)


def _table(agent: DemoAgent) -> str:
    rows = sorted(agent.members().values(), key=lambda m: m["name"])
    lines = [f"    {'name':<8} {'addr':<18} {'status':<8} {'inc':>4}  {'rtt':>8}"]
    for m in rows:
        rtt = "" if m.get("rtt_ms") is None else f"{m['rtt_ms']:.2f}ms"
        lines.append(f"    {m['name']:<8} {m['addr']:<18} {m['status']:<8} "
                     f"{m['incarnation']:>4}  {rtt:>8}")
    return "\n".join(lines)


def run_demo(agents: int = 5) -> int:
    if agents < 3:
        print("rumor demo: needs at least 3 agents", file=sys.stderr)
        return 2
    logdir = Path(tempfile.mkdtemp(prefix="rumor-demo-"))
    keydir = Path(tempfile.mkdtemp(prefix="rumor-demo-keys-"))
    from ..policy.keys import write_keypair
    _, public, _ = write_keypair(keydir / "ops")
    sink = SpanSink()  # the demo's OTLP collector: every sidecar exports its spans here
    cluster = [DemoAgent(f"agent-{i}", logdir, public, outbound=i == 0,
                         security=_security(keydir, f"agent-{i}", i), otlp=sink.url)
               for i in range(agents)]
    names = [a.name for a in cluster]
    t_start = time.monotonic()
    try:
        _say(f"Starting {agents} agents on {HOST} (profile local, logs in {logdir})")
        for i, a in enumerate(cluster):
            a.start(cluster[0] if i else None)
            if i == 0:
                _wait("the seed's API", lambda: bool(cluster[0].members()), 20)
        took = _wait("convergence", lambda: all(
            sum(1 for m in a.members().values() if m["status"] == "alive") == agents
            for a in cluster), 30)
        _say(f"\n1. Converged: every agent lists {agents} alive members "
             f"({took:.2f} s after the last start).")
        _say(_table(cluster[0]))
        _say(f"   Watch it live in a browser: http://{cluster[0].api}/ui/ (every agent's API "
             "serves the read-only web UI)")
        signed = sum(1 for m in cluster[0].members().values() if m.get("key_id"))
        _say(f"   Membership is signed: {signed} of {agents} members speak with a node key "
             "the demo CA vouched for, so no key holder can move or evict another.")
        _intruder(cluster[0], logdir)

        _discovery(cluster)
        _policy(cluster, keydir)
        if agents >= 5:
            _mesh(cluster, keydir, sink)
            _tcp_service(cluster)

        victim, watcher = cluster[-1], cluster[0]
        others = [a for a in cluster if a is not victim]
        inc_before = watcher.members()[victim.name]["incarnation"]
        _say(f"\n5. kill -9 {victim.name} (pid {victim.proc.pid if victim.proc else '?'})")
        assert victim.proc is not None
        victim.proc.send_signal(signal.SIGKILL)
        victim.proc.wait()
        t_kill = time.monotonic()
        seen: dict[tuple[str, str], float] = {}

        def progress() -> bool:
            for a in others:
                st = a.members().get(victim.name, {}).get("status")
                if st in ("suspect", "failed") and (a.name, st) not in seen:
                    seen[(a.name, st)] = time.monotonic() - t_kill
            return all((a.name, "failed") in seen for a in others)
        _wait("failure detection", progress, 30)
        first_suspect = min((t for (_, s), t in seen.items() if s == "suspect"), default=None)
        all_failed = max(t for (_, s), t in seen.items() if s == "failed")
        if first_suspect is not None:
            _say(f"   first suspicion after {first_suspect:.2f} s")
        _say(f"   every other agent lists {victim.name} failed after {all_failed:.2f} s")
        _explain(watcher, victim.name)
        _say(_table(watcher))

        _say(f"\n6. Restarting {victim.name} with the same name; it joins through "
             f"{cluster[0].name}")
        victim.start(cluster[0])
        took = _wait("rejoin", lambda: all(
            a.members().get(victim.name, {}).get("status") == "alive"
            and a.members()[victim.name]["incarnation"] > inc_before for a in cluster), 30)
        inc_after = watcher.members()[victim.name]["incarnation"]
        _say(f"   alive everywhere again after {took:.2f} s, incarnation "
             f"{inc_before} -> {inc_after} (it refuted its own failure)")
        took = _wait("the policy on the restarted agent",
                     lambda: _held(victim).get("web-access") == 1, 10)
        _say(f"   it started with no documents and holds web-access v1 again "
             f"({took:.2f} s: fetched in the join's digest exchange)")
        _say(_table(watcher))

        _say("\n7. Stopping every agent with SIGTERM (graceful leave)")
        for a in reversed(cluster[1:]):
            if a.proc is not None:
                a.proc.send_signal(signal.SIGTERM)
        _wait("the leaves", lambda: all(
            watcher.members().get(n, {}).get("status") == "left" for n in names[1:]), 20)
        _say(f"   {cluster[0].name} lists the other {agents - 1} agents as left")
        _say(f"\nDone in {time.monotonic() - t_start:.1f} s. Every agent logged its "
             f"membership events as JSON lines, e.g.:")
        _say("   " + _sample_event(victim.log_path))
        _stop_all(cluster)
        _remove_logs(cluster)
        return 0
    except (TimeoutError, OSError, ApiError) as e:
        print(f"rumor demo: {e} (agent logs in {logdir})", file=sys.stderr)
        return 1
    finally:
        _stop_all(cluster)
        sink.stop()
        shutil.rmtree(keydir, ignore_errors=True)


def _security(keydir: Path, name: str, index: int) -> list[str]:
    """Flags for one demo agent: its copy of the gossip keyring (keyring commands
    rewrite it) and a certificate from the demo CA naming the services it may run."""
    from ..gossip.keyring_file import generate_key
    from ..proxy.ca import init_ca, issue
    from ..proxy.node_credential import issue_node_credential
    ring = keydir / "keyring"
    if not ring.exists():
        ring.write_text(generate_key() + "\n")
        init_ca(keydir / "ca", "demo")
    mine = keydir / f"keyring-{name}"
    shutil.copyfile(ring, mine)
    services = ["frontend"] if index == 0 else ["shop", "web", "kv"]
    cert, key = issue(keydir / "ca", name, services, 1, keydir / name)
    # Signed membership: a node key in the agent's data dir, vouched for by the same CA,
    # so no key holder can speak for another agent (docs/security.md).
    data = keydir / f"data-{name}"
    issue_node_credential(keydir / "ca", name, data)
    return ["--keyring", str(mine), "--tls-ca", str(keydir / "ca" / "ca.crt"),
            "--tls-cert", str(cert), "--tls-key", str(key),
            "--data-dir", str(data), "--node-identity", "require"]


def _intruder(seed: DemoAgent, logdir: Path) -> None:
    """An agent without the gossip key tries to join, and is told why it cannot."""
    argv = [sys.executable, "-m", "rumor.cli", "agent", "--name", "intruder", "--bind",
            f"{HOST}:{free_port()}", "--api", f"{HOST}:{free_port()}", "--profile", "local",
            "--join", f"{HOST}:{seed.port}", "--log-level", "error"]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=30,
                         stdin=subprocess.DEVNULL)
    why = (res.stderr.strip().splitlines() or ["(no message)"])[-1]
    _say("   Gossip is encrypted (XChaCha20-Poly1305, --keyring) and the sidecars speak "
         "mutual TLS 1.3 (certificates from a demo CA).")
    _say(f"   An agent without the key tries to join: exit {res.returncode}, {why}")


def _sample_event(path: Path) -> str:
    try:
        for line in path.read_text().splitlines():
            if line.startswith("{") and '"event": "member"' in line.replace('":"', '": "'):
                return json.dumps(json.loads(line))
    except (OSError, ValueError):
        pass
    return "(no event found)"


def _stop_all(cluster: list[DemoAgent]) -> None:
    for a in cluster:
        if a.running() and a.proc is not None:
            a.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 5
    for a in cluster:
        if a.proc is None:
            continue
        try:
            a.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            a.proc.kill()
            a.proc.wait()


def _remove_logs(cluster: list[DemoAgent]) -> None:
    if os.environ.get("RUMOR_DEMO_KEEP_LOGS"):
        return
    for a in cluster:
        a.log_path.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        cluster[0].log_path.parent.rmdir()
