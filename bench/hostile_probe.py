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
    with cluster(work, 3) as c:
        a0, a1, a2 = c.agents
        for d in range(4):  # 6,000 fake members in 4 datagrams
            send_udp(packet(*[[ALIVE, 1, f"f{d}-{i}", [f"127.9.{d}.{i % 250 + 1}",
                                                        7000 + i // 250], {}]
                              for i in range(1500)]), a0)
        time.sleep(2.0)
        table = len(a0.members())
        health = http(a0.api, "GET", "/v1/health")[0]
        assert a2.proc is not None
        a2.proc.send_signal(signal.SIGKILL)
        a2.proc.wait()
        t0 = time.monotonic()
        detected: float | None = None
        while time.monotonic() - t0 < 60:
            if a0.status_of("a2") not in ("alive", None):
                detected = round(time.monotonic() - t0, 2)
                break
            time.sleep(0.05)
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
                "failure_detected_s": detected, "reflected_datagrams": got}


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
