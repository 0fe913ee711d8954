#!/usr/bin/env python3
"""TCP through the sidecar pair: one connection's throughput and connections per second.

Every target carries the same loopback TCP service (a sink/echo server in its own
process), side by side in one run:

- ``direct``: the client connects to the service itself;
- ``haproxy``: one haproxy in ``mode tcp`` (``nbthread 1``) in front of it;
- ``haproxy-pair`` and ``haproxy-pair-tls``: two haproxies in a row, the second hop
  plain or mutual TLS (``verify required`` both ways): the same shape as the mesh;
- ``rumor`` and ``rumor-tls``: a caller agent's upstream port (``--upstream``) to a
  callee agent's inbound listener serving the service declared ``protocol=tcp``, the
  sidecar hop plain or over mutual TLS (certificates from a cluster CA made here).

Measured per target and round: ``up`` (the client writes ``--mib`` MiB on one
connection, shuts its side, and the service answers with the byte count: MiB/s from
connect to that answer), ``down`` (the service writes ``--mib`` MiB and closes: MiB/s
to EOF), and ``cps`` (connections per second for ``--cps-seconds``, one at a time:
connect, 33 bytes up (a mode byte and 32), 32 back, close). Rounds alternate the
target order (ABBA) so drift and the VM's steal hit every target alike; each figure is
reported as median and range over rounds. With ``--quiet`` each measurement first
waits for an idle machine (at most ``--quiet-wait`` s). Per measurement the machine's
busy and steal shares come from ``/proc/stat`` and the proxy processes' own CPU from
``/proc/PID/stat``: CPU seconds per GiB and CPU microseconds per connection.

    python3 bench/tcp_throughput.py --rounds 5 --haproxy-bufsize 65536 --quiet 0.2 \\
        --quiet-wait 5 --results-dir /tmp/tcp-bench

Writes ``round-N.json`` per round and ``summary.json`` under ``--results-dir``, and
prints a Markdown table. The agents run the LAN profile at log level warning.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
CHUNK = 1 << 20
HOST = "127.0.0.1"


# ---- the service (run as its own process: ``--serve PORT``) ------------------------------


def serve(port: int) -> None:
    """First byte ``S``: read to EOF, answer the count (ASCII) and close. ``D`` + 8-byte
    length: write that many bytes and close. ``E``: echo until EOF."""
    lsock = socket.socket()
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind((HOST, port))
    lsock.listen(512)
    block = bytes(CHUNK)

    def one(conn: socket.socket) -> None:
        with conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                mode = conn.recv(1)
                if mode == b"S":
                    buf = bytearray(CHUNK)
                    n = 0
                    while got := conn.recv_into(buf):
                        n += got
                    conn.sendall(str(n).encode())
                elif mode == b"D":
                    size = _exactly(conn, 8)
                    left = int.from_bytes(size, "big")
                    view = memoryview(block)
                    while left:
                        k = min(left, CHUNK)
                        conn.sendall(view[:k])
                        left -= k
                elif mode == b"E":
                    while data := conn.recv(65536):
                        conn.sendall(data)
            except OSError:
                pass

    while True:
        conn, _ = lsock.accept()
        threading.Thread(target=one, args=(conn,), daemon=True).start()


def _exactly(s: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        data = s.recv(n - len(out))
        if not data:
            raise ConnectionError("closed early")
        out += data
    return bytes(out)


# ---- the client's measurements -----------------------------------------------------------


def upload(port: int, mib: int) -> float:
    """MiB/s of ``mib`` MiB written on one connection (until the service's count)."""
    block = memoryview(bytes(CHUNK))
    t0 = time.perf_counter()
    with socket.create_connection((HOST, port), timeout=60) as s:
        s.sendall(b"S")
        for _ in range(mib):
            s.sendall(block)
        s.shutdown(socket.SHUT_WR)
        answer = bytearray()
        while data := s.recv(64):
            answer += data
    took = time.perf_counter() - t0
    if int(answer or b"0") != mib * CHUNK:
        raise RuntimeError(f"upload: the service counted {answer!r}, not {mib * CHUNK}")
    return mib / took


def download(port: int, mib: int) -> float:
    """MiB/s of ``mib`` MiB the service writes on one connection (until EOF)."""
    buf = bytearray(CHUNK)
    n = 0
    t0 = time.perf_counter()
    with socket.create_connection((HOST, port), timeout=60) as s:
        s.sendall(b"D" + (mib * CHUNK).to_bytes(8, "big"))
        while got := s.recv_into(buf):
            n += got
    took = time.perf_counter() - t0
    if n != mib * CHUNK:
        raise RuntimeError(f"download: got {n} bytes, not {mib * CHUNK}")
    return mib / took


def cps(port: int, seconds: float) -> tuple[float, int]:
    """(connections per second, connections) one at a time for ``seconds``."""
    msg = bytes(32)
    n = 0
    t0 = time.perf_counter()
    end = t0 + seconds
    while time.perf_counter() < end:
        with socket.create_connection((HOST, port), timeout=10) as s:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.sendall(b"E" + msg)
            if _exactly(s, len(msg)) != msg:
                raise RuntimeError("cps: a wrong echo")
        n += 1
    return n / (time.perf_counter() - t0), n


def works(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=2) as s:
            s.settimeout(2)
            s.sendall(b"Eping")
            return _exactly(s, 4) == b"ping"
    except OSError:
        return False


# ---- system and process CPU ----------------------------------------------------------------


def sys_cpu() -> tuple[int, int, int]:
    """(total, idle+iowait, steal) jiffies over all CPUs."""
    with open("/proc/stat") as f:
        vals = [int(x) for x in f.readline().split()[1:9]]
    return sum(vals), vals[3] + vals[4], vals[7]


def proc_ticks(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                rest = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(rest[11]) + int(rest[12])
    return total


#: The bench's own processes besides the proxies (this client, the service).
OURS: list[int] = [os.getpid()]


#: Wait before a measurement until the machine is at most this busy (``--quiet``), for
#: at most so many seconds (``--quiet-wait``).
QUIET = [1.0, 30.0]


def wait_quiet() -> float:
    """Seconds waited until a 0.5 s window finds the machine at most ``QUIET`` busy (a
    neighbour's test run between measurements), giving up after ``--quiet-wait``."""
    t0 = time.perf_counter()
    while QUIET[0] < 1.0 and time.perf_counter() - t0 < QUIET[1]:
        a = sys_cpu()
        time.sleep(0.5)
        b = sys_cpu()
        if 1 - (b[1] - a[1]) / max(1, b[0] - a[0]) <= QUIET[0]:
            break
    return time.perf_counter() - t0


def measured(fn: Callable[[], Any], pids: list[int]) -> dict[str, Any]:
    """``fn()``'s value with the CPU around it: the proxies' CPU seconds, the machine's
    busy and steal shares, and ``others``: the busy share not spent by the bench's
    processes (a neighbour's load; it mixes tick-sampled counters, so it is rough)."""
    waited = wait_quiet()
    s0, p0, o0, w0 = sys_cpu(), proc_ticks(pids), proc_ticks(OURS), time.perf_counter()
    value = fn()
    s1, p1, o1, w1 = sys_cpu(), proc_ticks(pids), proc_ticks(OURS), time.perf_counter()
    total = max(1, s1[0] - s0[0])
    busy = 1 - (s1[1] - s0[1]) / total
    ours = (p1 - p0 + o1 - o0) / CLK_TCK / max(w1 - w0, 1e-9) / (os.cpu_count() or 1)
    return {"value": value, "wall": w1 - w0, "proxy_cpu": (p1 - p0) / CLK_TCK,
            "busy": busy, "steal": (s1[2] - s0[2]) / total,
            "others": max(0.0, busy - ours), "waited": waited}


# ---- targets -------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


class Run:
    """The processes of one run (killed at the end)."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        log = open(self.work / f"{name}.log", "ab")  # noqa: SIM115
        p = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL)
        self.procs.append(p)
        return p

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()


HAPROXY = """global
    nbthread 1
    maxconn 8000
{tune}defaults
    mode tcp
    timeout connect 5s
    timeout client 75s
    timeout server 75s
frontend fe
    bind {bind}
    default_backend be
backend be
    server s1 {server}
"""


#: ``tune.bufsize`` for every haproxy (``--haproxy-bufsize``; 0: its default, 16 KiB).
BUFSIZE = [0]


def haproxy(run: Run, name: str, listen: int, to: int, *, bind_ssl: str = "",
            server_ssl: str = "") -> int:
    cfg = run.work / f"{name}.cfg"
    tune = f"    tune.bufsize {BUFSIZE[0]}\n" if BUFSIZE[0] else ""
    cfg.write_text(HAPROXY.format(tune=tune, bind=f"{HOST}:{listen}{bind_ssl}",
                                  server=f"{HOST}:{to}{server_ssl}"))
    chk = subprocess.run(["haproxy", "-c", "-q", "-f", str(cfg)], capture_output=True,
                         text=True)
    if chk.returncode != 0:
        raise RuntimeError(f"haproxy {name}: {chk.stdout}{chk.stderr}")
    return run.start(name, ["haproxy", "-db", "-f", str(cfg)]).pid


def rumor_pair(run: Run, name: str, service_port: int, tls: dict[str, list[str]] | None,
               ) -> tuple[int, list[int]]:
    """A caller and a callee agent; (the caller's upstream port, their pids)."""
    agent = [sys.executable, "-m", "rumor.cli", "agent", "--profile", "lan",
             "--log-level", "warning"]
    up, gossip = free_port(), free_port()
    tls = tls or {}
    caller = run.start(f"{name}-caller", [
        *agent, "--name", "caller", "--bind", f"{HOST}:{gossip}", "--api",
        f"{HOST}:{free_port()}", "--upstream", f"bench={HOST}:{up}",
        "--identity", "loadgen", *tls.get("caller", [])])
    callee = run.start(f"{name}-callee", [
        *agent, "--name", "callee", "--bind", f"{HOST}:{free_port()}", "--api",
        f"{HOST}:{free_port()}", "--inbound", f"{HOST}:{free_port()}", "--join",
        f"{HOST}:{gossip}", "--service", f"name=bench,port={service_port},protocol=tcp",
        *tls.get("callee", [])])
    return up, [caller.pid, callee.pid]


def certificates(work: Path) -> tuple[dict[str, list[str]], dict[str, Path]]:
    """Agent TLS flags, and PEM files (certificate + key) for haproxy."""
    from rumor.proxy.ca import init_ca, issue
    ca = work / "ca"
    if not (ca / "ca.key").exists():
        init_ca(ca, "bench")
    flags: dict[str, list[str]] = {}
    pems: dict[str, Path] = {"ca": ca / "ca.crt"}
    for node, svc in (("caller", "loadgen"), ("callee", "bench")):
        cert, key = issue(ca, node, [svc], 1, work / node)
        flags[node] = ["--tls-ca", str(ca / "ca.crt"), "--tls-cert", str(cert),
                       "--tls-key", str(key)]
        pem = work / f"{node}.pem"
        pem.write_bytes(cert.read_bytes() + key.read_bytes())
        pems[node] = pem
    return flags, pems


def start_targets(run: Run, names: list[str], service: int) -> dict[str, tuple[int, list[int]]]:
    """Port and proxy pids per target."""
    out: dict[str, tuple[int, list[int]]] = {}
    flags, pems = certificates(run.work)
    for name in names:
        if name == "direct":
            out[name] = (service, [])
        elif name == "haproxy":
            port = free_port()
            out[name] = (port, [haproxy(run, name, port, service)])
        elif name in ("haproxy-pair", "haproxy-pair-tls"):
            port, mid = free_port(), free_port()
            bind_ssl = server_ssl = ""
            if name.endswith("-tls"):
                bind_ssl = f" ssl crt {pems['callee']} ca-file {pems['ca']} verify required"
                server_ssl = f" ssl crt {pems['caller']} ca-file {pems['ca']} verify required"
            back = haproxy(run, f"{name}-callee", mid, service, bind_ssl=bind_ssl)
            front = haproxy(run, f"{name}-caller", port, mid, server_ssl=server_ssl)
            out[name] = (port, [front, back])
        elif name in ("rumor", "rumor-tls"):
            out[name] = rumor_pair(run, name, service,
                                   flags if name.endswith("-tls") else None)
        else:
            raise SystemExit(f"unknown target {name!r}")
    for name, (port, _) in out.items():
        deadline = time.monotonic() + 40
        while not works(port):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name}: no echo through port {port} after 40 s "
                                   f"(logs in {run.work})")
            time.sleep(0.2)
    return out


# ---- the run -------------------------------------------------------------------------------


def one_round(targets: dict[str, tuple[int, list[int]]], order: list[str],
              args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for name in order:
        port, pids = targets[name]
        res = {"up": measured(partial(upload, port, args.mib), pids),
               "down": measured(partial(download, port, args.mib), pids)}
        c = measured(partial(cps, port, args.cps_seconds), pids)
        c["connections"] = c["value"][1]
        c["value"] = c["value"][0]
        res["cps"] = c
        out[name] = res
        print(f"  {name:17s} up {res['up']['value']:7.1f} MiB/s  down "
              f"{res['down']['value']:7.1f} MiB/s  {c['value']:7.0f} conn/s  steal "
              f"{max(r['steal'] for r in res.values()):.1%}", file=sys.stderr, flush=True)
    return out


def summarize(rounds: list[dict[str, dict[str, Any]]], mib: int) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for name in rounds[0]:
        s: dict[str, Any] = {}
        for kind in ("up", "down", "cps"):
            vals = [r[name][kind]["value"] for r in rounds]
            cpu = [r[name][kind]["proxy_cpu"] for r in rounds]
            per = [c / (mib / 1024) for c in cpu] if kind != "cps" else [
                c / r[name][kind]["connections"] * 1e6 for c, r in zip(cpu, rounds, strict=True)]
            s[kind] = {"median": statistics.median(vals), "min": min(vals),
                       "max": max(vals),
                       "cpu_median": statistics.median(per),
                       "steal_max": max(r[name][kind]["steal"] for r in rounds),
                       "others_median": statistics.median(r[name][kind]["others"]
                                                          for r in rounds),
                       "busy_median": statistics.median(r[name][kind]["busy"]
                                                        for r in rounds)}
        summary[name] = s
    return summary


def table(summary: dict[str, Any]) -> str:
    lines = ["| target | up MiB/s (range) | proxy CPU s/GiB | down MiB/s (range) | "
             "proxy CPU s/GiB | conn/s (range) | proxy CPU µs/conn |",
             "|---|---|---|---|---|---|---|"]
    for name, s in summary.items():
        u, d, c = s["up"], s["down"], s["cps"]
        lines.append(
            f"| {name} | {u['median']:.0f} ({u['min']:.0f}–{u['max']:.0f}) | "
            f"{u['cpu_median']:.2f} | {d['median']:.0f} ({d['min']:.0f}–{d['max']:.0f}) | "
            f"{d['cpu_median']:.2f} | {c['median']:.0f} ({c['min']:.0f}–{c['max']:.0f}) | "
            f"{c['cpu_median']:.0f} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--targets", default="direct,haproxy,haproxy-pair,haproxy-pair-tls,"
                    "rumor,rumor-tls")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--mib", type=int, default=256, help="MiB per throughput connection")
    ap.add_argument("--cps-seconds", type=float, default=3.0)
    ap.add_argument("--haproxy-bufsize", type=int, default=0,
                    help="haproxy tune.bufsize (default: haproxy's own, 16384); rumor "
                    "reads 64 KiB at a time")
    ap.add_argument("--quiet", type=float, default=1.0,
                    help="before each measurement wait until the machine is at most "
                    "this busy over 0.5 s (e.g. 0.1; default 1: no wait)")
    ap.add_argument("--quiet-wait", type=float, default=30.0,
                    help="longest wait for --quiet, seconds")
    ap.add_argument("--results-dir", type=Path, default=Path("/tmp/rumor-tcp-bench"))
    args = ap.parse_args()
    if args.serve is not None:
        serve(args.serve)
        return 0
    BUFSIZE[0] = args.haproxy_bufsize
    QUIET[:] = [args.quiet, args.quiet_wait]
    res = args.results_dir
    work = res / "work"
    work.mkdir(parents=True, exist_ok=True)
    names = args.targets.split(",")
    run = Run(work)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    try:
        service = free_port()
        OURS.append(run.start("service", [sys.executable, str(Path(__file__).resolve()),
                                          "--serve", str(service)]).pid)
        deadline = time.monotonic() + 10
        while not works(service):
            if time.monotonic() > deadline:
                raise RuntimeError("the service did not start")
            time.sleep(0.05)
        targets = start_targets(run, names, service)
        with open("/proc/loadavg") as f:
            load = f.read().split()[:3]
        meta = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "loadavg_before": load, "cpus": os.cpu_count(), "args": {
                    k: str(v) for k, v in vars(args).items()},
                "haproxy_bufsize": args.haproxy_bufsize or 16384,
                "haproxy": subprocess.run(["haproxy", "-v"], capture_output=True,
                                          text=True).stdout.splitlines()[0]}
        print(f"warm-up (load {' '.join(load)})", file=sys.stderr)
        warm = argparse.Namespace(mib=16, cps_seconds=0.5)
        one_round(targets, names, warm)
        rounds = []
        for r in range(args.rounds):
            order = names if r % 2 == 0 else names[::-1]
            print(f"round {r + 1}/{args.rounds}", file=sys.stderr)
            got = one_round(targets, order, args)
            (res / f"round-{r + 1}.json").write_text(json.dumps(got, indent=1))
            rounds.append(got)
        summary = summarize(rounds, args.mib)
        (res / "summary.json").write_text(json.dumps({"meta": meta, "summary": summary},
                                                     indent=1))
        print(table(summary))
        steal = max(s[k]["steal_max"] for s in summary.values() for k in s)
        others = max(s[k]["others_median"] for s in summary.values() for k in s)
        waited = sum(r[n][k]["waited"] for r in rounds for n in r for k in r[n])
        with open("/proc/loadavg") as f:
            after = f.read().split()[:3]
        meta["loadavg_after"] = after
        (res / "summary.json").write_text(json.dumps({"meta": meta, "summary": summary},
                                                     indent=1))
        print(f"\n{args.rounds} rounds (ABBA), {args.mib} MiB per throughput connection, "
              f"{args.cps_seconds:g} s of connections per round; steal at most "
              f"{steal:.1%}; others' CPU (median, worst target) {others:.1%}; waited "
              f"{waited:.0f} s for a quiet machine; load "
              f"before {' '.join(load)}, after {' '.join(after)}")
    finally:
        run.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
