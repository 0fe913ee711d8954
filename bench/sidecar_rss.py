#!/usr/bin/env python3
"""Sidecar memory under load: the resident size of every agent of a sidecar pair.

Starts three harness backends (``../shared/anchors/proxy/backend.py``) and the pair of
``bench/proxy_pair.py`` (caller's outbound → a callee's inbound → backend, LAN gossip),
samples ``VmRSS`` of each agent every 200 ms while idle and then while ``wrk`` drives the
outbound listener at each concurrency given, and prints one JSON line per phase and
agent: idle RSS, peak under load, and the throughput wrk saw. Then a 1 GiB streamed
upload through the pair, with the peak growth of each agent. Everything on 127.0.0.1;
every process is stopped at the end.

    .venv/bin/python bench/sidecar_rss.py --conns 16,64 --duration 15
    RUMOR_PAIR_TLS=1 .venv/bin/python bench/sidecar_rss.py   # the hop over mutual TLS
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
ANCHORS = HERE.parent.parent / "shared" / "anchors" / "proxy"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except FileNotFoundError:
        pass
    return 0


def agents(pair_pid: int) -> dict[int, str]:
    """The agent processes the pair started, by pid, named by their ``--name``."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmd = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pair_pid and b"--name" in cmd:
            found[int(entry.name)] = cmd[cmd.index(b"--name") + 1].decode()
    return found


class Sampler:
    """Peak RSS per pid, sampled every ``period`` seconds on a thread."""

    def __init__(self, pids: dict[int, str], period: float = 0.2) -> None:
        self.pids = pids
        self.peak = {pid: rss_kib(pid) for pid in pids}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(period,), daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self, period: float) -> None:
        while not self._stop.wait(period):
            for pid in self.pids:
                self.peak[pid] = max(self.peak[pid], rss_kib(pid))


def wait_ready(port: int, host: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            req = urllib.request.Request(f"http://127.0.0.1:{port}/", headers={"host": host})
            with urllib.request.urlopen(req, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise SystemExit(f"the pair did not serve on :{port} within {timeout:.0f} s")


def upload(port: int, host: str, size: int) -> float:
    """Stream ``size`` bytes up through the pair; returns the seconds it took."""
    chunk = b"x" * (1 << 20)
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    started = time.monotonic()
    c.putrequest("PUT", "/upload", skip_host=True)
    c.putheader("host", host)
    c.putheader("content-length", str(size))
    c.endheaders()
    for _ in range(size // len(chunk)):
        c.send(chunk)
    r = c.getresponse()
    r.read()
    if r.status != 200:
        raise SystemExit(f"upload answered {r.status}")
    c.close()
    return time.monotonic() - started


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--conns", default="16,64", help="wrk concurrencies, comma-separated")
    ap.add_argument("--duration", type=int, default=15, help="seconds of load per phase")
    ap.add_argument("--upload-mib", type=int, default=1024, help="0 skips the upload")
    args = ap.parse_args()
    host = "bench"
    work = Path(tempfile.mkdtemp(prefix="rumor-rss-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        backends = []
        for i in range(3):
            port = free_port()
            procs.append(subprocess.Popen(
                [sys.executable, str(ANCHORS / "backend.py"), "--port", str(port),
                 "--name", f"b{i + 1}"], start_new_session=True,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            backends.append(f"127.0.0.1:{port}")
        listen = free_port()
        env = {**os.environ, "BENCH_LISTEN": f"127.0.0.1:{listen}",
               "BENCH_BACKENDS": ",".join(backends), "BENCH_SERVICE": host,
               "BENCH_WORKDIR": str(work)}
        pair = subprocess.Popen([sys.executable, str(HERE / "proxy_pair.py")], env=env,
                                cwd=work, start_new_session=True)
        procs.append(pair)
        wait_ready(listen, host)
        pids = agents(pair.pid)
        time.sleep(3)
        idle = {pid: rss_kib(pid) for pid in pids}
        for conns in [int(c) for c in args.conns.split(",")]:
            with Sampler(pids) as sampler:
                out = subprocess.run(
                    ["wrk", "-t1", f"-c{conns}", f"-d{args.duration}s", "-H", f"Host: {host}",
                     f"http://127.0.0.1:{listen}/"], capture_output=True, text=True,
                    check=True).stdout
            rate = next((float(line.split()[1]) for line in out.splitlines()
                         if line.startswith("Requests/sec")), 0.0)
            for pid, name in sorted(pids.items(), key=lambda kv: kv[1]):
                print(json.dumps({"phase": f"wrk -c{conns}", "agent": name,
                                  "req_per_s": rate, "idle_mib": round(idle[pid] / 1024, 1),
                                  "peak_mib": round(sampler.peak[pid] / 1024, 1)}))
        if args.upload_mib:
            before = {pid: rss_kib(pid) for pid in pids}
            with Sampler(pids) as sampler:
                seconds = upload(listen, host, args.upload_mib << 20)
            for pid, name in sorted(pids.items(), key=lambda kv: kv[1]):
                print(json.dumps({
                    "phase": f"upload {args.upload_mib} MiB", "agent": name,
                    "seconds": round(seconds, 2),
                    "mib_per_s": round(args.upload_mib / seconds, 1),
                    "before_mib": round(before[pid] / 1024, 1),
                    "peak_mib": round(sampler.peak[pid] / 1024, 1)}))
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
    return 0


if __name__ == "__main__":
    sys.exit(main())
