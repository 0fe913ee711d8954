#!/usr/bin/env python3
"""Service catalog benchmark: replication latency, health-check removal, DNS throughput.

Starts ``--nodes`` real ``rumor agent`` processes on 127.0.0.1 (``--profile``, LAN by
default) and measures:

1. registration -> visible on every agent: a service is registered through one
   agent's API while every agent holds a blocking query (``?index=N&wait=...``) on
   it; the time until the last of them returns with the instance. Median and max
   over ``--trials`` registrations on random agents (target: median ≤ 1 s).
2. failing check -> removed everywhere: one agent runs an HTTP check
   (``interval``/``fall`` below) against a local health endpoint that the bench
   flips to 500; reported: when the owning agent marked it critical (the check's own
   detection), and when the last agent dropped it (target: ≤ detection + 1 s).
3. DNS queries/s answered by one agent: a single-socket loopback load generator keeps
   ``--inflight`` A queries outstanding for ``--dns-seconds`` and counts answers.

Visibility is reported as a distribution (p50, p95, p99, max, trials slower than 1 s).
``--trace`` runs every agent with ``--trace-gossip`` and follows each registration's
message through the trace files (``rumor.simulations.spread``): a second, independent
measure of when each agent got it (its first copy, or the first push-pull after the
registration for an agent that got none), and how evenly the copies were spread,
figures ``rumor sim catalog`` reports for the simulator. ``--loss 0.1`` drops 10% of
all gossip packets, UDP and TCP, with nftables (on loopback, for the agents' gossip
ports only; the rule is removed at the end).

    python bench/catalog_bench.py                  # 30 agents, LAN profile
    python bench/catalog_bench.py --nodes 10 --trials 5 --json
    python bench/catalog_bench.py --trials 200 --check-trials 20 --trace --loss 0.1
"""

from __future__ import annotations

import argparse
import json
import os
import random
import select
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from dnslib import DNSRecord
from figures import distribution  # bench/figures.py, beside this script
from netloss import Loss  # bench/netloss.py, beside this script

from rumor.cli.ports import free_port

JSON = {"content-type": "application/json"}

HOST = "127.0.0.1"
#: How long a trial waits for every agent: beyond the 30 s push-pull period, so even a
#: straggler the epidemic missed is measured, not cut off.
WATCH_LIMIT = 45.0


class Agent:
    def __init__(self, i: int, workdir: Path, profile: str) -> None:
        self.name = f"n{i:02d}"
        self.port, self.api_port, self.dns_port = free_port(), free_port(), free_port()
        self.profile = profile
        self.log = workdir / f"{self.name}.log"
        self.trace: Path | None = None
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def api(self) -> str:
        return f"{HOST}:{self.api_port}"

    def start(self, seed: Agent | None, extra: list[str]) -> None:
        argv = [sys.executable, "-m", "rumor.cli", "agent", "--name", self.name,
                *(["--trace-gossip", str(self.trace)] if self.trace else []),
                "--bind", f"{HOST}:{self.port}", "--api", self.api, "--profile", self.profile,
                "--log-format", "json", "--log-level", "warning",
                "--dns", f"{HOST}:{self.dns_port}", *extra]
        if seed is not None:
            argv += ["--join", f"{HOST}:{seed.port}"]
        with open(self.log, "ab") as f:
            self.proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)

    def get(self, path: str, timeout: float = 5) -> tuple[Any, int]:
        with urllib.request.urlopen(f"http://{self.api}{path}", timeout=timeout) as r:
            return json.loads(r.read()), int(r.headers.get("x-rumor-index", "0"))

    def put(self, path: str, doc: Any) -> Any:
        req = urllib.request.Request(f"http://{self.api}{path}", method="PUT", headers=JSON,
                                     data=json.dumps(doc).encode())
        with urllib.request.urlopen(req, timeout=5) as r:
            return json.loads(r.read())


def wait_for(cond: Any, timeout: float, what: str) -> None:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.1)


def _alive_count(a: Agent) -> int:
    try:
        members, _ = a.get("/v1/members", timeout=2)
    except (OSError, ValueError):
        return -1
    return sum(1 for m in members if m["status"] == "alive")


def until_visible(agents: list[Agent], service: str, present: bool, timeout: float,
                  start_index: dict[str, int]) -> dict[str, float]:
    """Blocking queries on every agent; returns when each saw the wanted state."""
    seen: dict[str, float] = {}

    def watch(a: Agent) -> None:
        index = start_index[a.name]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rows, index = a.get(f"/v1/catalog/service/{service}?index={index}&wait=10s",
                                timeout=15)
            if bool(rows) == present:
                seen[a.name] = time.monotonic()
                return

    with ThreadPoolExecutor(len(agents)) as pool:
        list(pool.map(watch, agents))
    return seen


def bench_registration(agents: list[Agent], trials: int,
                       rng: random.Random) -> list[tuple[float, str, float]]:
    """Registrations one after another: (time to all agents, owner, start) of each."""
    out = []
    for t in range(trials):
        name = f"reg{t}"
        index = {a.name: a.get(f"/v1/catalog/service/{name}")[1] for a in agents}
        owner = rng.choice(agents)
        result: dict[str, float] = {}
        th = threading.Thread(target=lambda n=name, i=index, r=result: r.update(
            until_visible(agents, n, True, WATCH_LIMIT, i)))
        th.start()
        time.sleep(0.5)  # let every blocking query park
        t0 = time.monotonic()
        owner.put("/v1/agent/service/register", {"name": name, "port": 10000 + t,
                                                 "tags": ["bench"]})
        th.join()
        if len(result) != len(agents):  # counted as the watch limit: a lower bound
            print(f"   {name} reached only {len(result)} of {len(agents)} agents in "
                  f"{WATCH_LIMIT:.0f} s", file=sys.stderr, flush=True)
        took = max(result.values()) - t0 if len(result) == len(agents) else WATCH_LIMIT
        out.append((took, owner.name, t0))
        print(f"   registration {t}: on all {len(agents)} after {out[-1][0] * 1000:.0f} ms",
              file=sys.stderr, flush=True)
    return out


def trace_analysis(agents: list[Agent], trials: list[tuple[float, str, float]]
                   ) -> dict[str, Any]:
    """Each registration followed through the agents' trace files."""
    from rumor.simulations.spread import copy_profile, first_sent_after, follow, read_trace_files
    events = list(read_trace_files(a.trace for a in agents if a.trace))
    spreads = follow(events)
    pulls: dict[str, list[float]] = {}
    for t, node, direction, _peer, _msgs in events:
        if direction == "push-pull":
            pulls.setdefault(node, []).append(t)
    names = [a.name for a in agents]
    profiles, learnt = [], []
    for took, owner, t0 in trials:
        s = first_sent_after(spreads, owner, t0)
        if s is None:
            continue
        prof = copy_profile(s, names) | {"took_s": round(took, 3)}
        profiles.append(prof)
        last = 0.0
        for n in names:
            if n == owner:
                continue
            first = s.first(n)
            if first is None:  # no copy: learnt from the next push-pull
                first = min((t for t in pulls.get(n, []) if t >= t0), default=t0 + 60)
            last = max(last, first - t0)
        learnt.append(last)
    slow = [p for p in profiles if p["took_s"] > 1.0]
    return {"registration_by_trace_s": distribution(learnt) if learnt else {},
            "least_served_copies": distribution([p["min_copies"] for p in profiles]),
            "trials_with_an_agent_without_copy": sum(1 for p in profiles
                                                     if p["nodes_without_copy"]),
            "copies_sent_per_registration": distribution(
                [p["copies_sent"] for p in profiles]),
            "slow_trials": slow[:20]}


class Health:
    def __init__(self) -> None:
        self.ok = True
        health = self

        class H(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200 if health.ok else 500)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *a: Any) -> None:
                pass

        self.server = ThreadingHTTPServer((HOST, 0), H)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def bench_check(agents: list[Agent], health: Health, trials: int, interval: float,
                fall: int, rng: random.Random) -> list[dict[str, float]]:
    owner = agents[0]
    out = []
    for t in range(trials):
        health.ok = True
        wait_for(lambda: all(a.get("/v1/catalog/service/checked")[0] for a in agents), 30,
                 "the checked service to be passing everywhere")
        time.sleep(rng.uniform(0, interval))  # fail at a random phase of the interval
        index = {a.name: a.get("/v1/catalog/service/checked")[1] for a in agents}
        result: dict[str, float] = {}
        th = threading.Thread(target=lambda i=index, r=result: r.update(
            until_visible(agents, "checked", False, WATCH_LIMIT, i)))
        th.start()
        time.sleep(0.3)
        t0 = time.monotonic()
        health.ok = False
        th.join()
        detect = result.get(owner.name, t0 + WATCH_LIMIT) - t0
        everywhere = max(result.values()) - t0 if len(result) == len(agents) else WATCH_LIMIT
        out.append({"detect": detect, "everywhere": everywhere,
                    "spread": everywhere - detect})
        print(f"   check {t}: critical on the owner after {detect * 1000:.0f} ms, "
              f"gone everywhere after {everywhere * 1000:.0f} ms", file=sys.stderr,
              flush=True)
    health.ok = True
    return out


def gossip_totals(agents: list[Agent]) -> dict[str, int]:
    """Sums of the agents' gossip counters (repairs, push-pulls, bytes)."""
    out: dict[str, int] = {}
    for a in agents:
        stats = a.get("/v1/health")[0].get("stats", {})
        for k in ("state_repairs", "stream_push_pull", "bytes_out", "packets_out",
                  "user_messages_out"):
            out[k] = out.get(k, 0) + int(stats.get(k, 0))
    return out


def bench_dns(agent: Agent, seconds: float, inflight: int) -> dict[str, float]:
    """Keep ``inflight`` queries outstanding on one socket; count answers per second."""
    queries = []
    for qid in range(65536):
        q = DNSRecord.question("web.service.rumor", "A")
        q.header.id = qid
        queries.append(q.pack())
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
    s.connect((HOST, agent.dns_port))
    s.setblocking(False)
    sent = answered = errors = 0
    outstanding = 0
    t0 = time.monotonic()
    end = t0 + seconds
    last_progress = t0
    while True:
        now = time.monotonic()
        if now >= end:
            break
        while outstanding < inflight:
            s.send(queries[sent & 0xFFFF])
            sent += 1
            outstanding += 1
        r, _, _ = select.select([s], [], [], 0.2)
        if not r:
            if now - last_progress > 0.2:  # lost datagrams: refill the window
                outstanding = 0
            continue
        while True:
            try:
                data = s.recv(4096)
            except BlockingIOError:
                break
            answered += 1
            outstanding = max(0, outstanding - 1)
            last_progress = time.monotonic()
            if len(data) < 12 or data[3] & 0x0F:
                errors += 1
    took = time.monotonic() - t0
    s.close()
    return {"qps": answered / took, "sent": sent, "answered": answered, "errors": errors,
            "seconds": took}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, default=30)
    p.add_argument("--profile", default="lan", choices=["lan", "local", "wan"])
    p.add_argument("--trials", type=int, default=9)
    p.add_argument("--check-trials", type=int, default=5)
    p.add_argument("--interval", type=float, default=1.0, help="check interval (s)")
    p.add_argument("--fall", type=int, default=1)
    p.add_argument("--dns-seconds", type=float, default=5.0)
    p.add_argument("--inflight", type=int, default=64)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--trace", action="store_true",
                   help="trace every agent's gossip and follow each registration")
    p.add_argument("--loss", type=float, default=0.0,
                   help="drop this fraction of all gossip packets (nftables; root)")
    p.add_argument("--no-dns", action="store_true", help="skip the DNS throughput part")
    p.add_argument("--tune", action="append", default=[], metavar="NAME=VALUE",
                   help="passed to every agent (rumor agent --tune)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    rng = random.Random(args.seed)
    workdir = Path(tempfile.mkdtemp(prefix="rumor-catalog-bench-"))
    health = Health()
    timeout = min(0.5, args.interval)
    check = (f"name=checked,port={health.port},check=http://{HOST}:{health.port}/healthz,"
             f"interval={args.interval}s,timeout={timeout}s,fall={args.fall}")
    web = "name=web,port=8080,tags=bench"
    agents = [Agent(i, workdir, args.profile) for i in range(args.nodes)]
    if args.trace:
        for a in agents:
            a.trace = workdir / f"{a.name}.trace"
    loss: Loss | None = None
    try:
        print(f"starting {args.nodes} agents (profile {args.profile}, logs in {workdir})",
              file=sys.stderr, flush=True)
        for i, a in enumerate(agents):
            extra = ["--service", check, "--service", web] if i == 0 else []
            extra += [x for t in args.tune for x in ("--tune", t)]
            a.start(agents[0] if i else None, extra)
            if i == 0:
                wait_for(lambda: _alive_count(agents[0]) >= 1, 20, "the seed")
        wait_for(lambda: all(_alive_count(a) == args.nodes for a in agents), 120,
                 "convergence")
        time.sleep(2)
        if args.loss:
            loss = Loss(args.loss, [a.port for a in agents])
        print("1. registration -> visible everywhere", file=sys.stderr, flush=True)
        trials = bench_registration(agents, args.trials, rng)
        reg = [took for took, _, _ in trials]
        print("2. failing check -> removed everywhere", file=sys.stderr, flush=True)
        chk = bench_check(agents, health, args.check_trials, args.interval, args.fall, rng)
        dns: dict[str, float] = {}
        if not args.no_dns:
            print("3. DNS throughput of one agent", file=sys.stderr, flush=True)
            dns = bench_dns(agents[-1], args.dns_seconds, args.inflight)
        detection_bound = args.fall * args.interval + timeout
        res = {
            "nodes": args.nodes, "profile": args.profile, "loss": args.loss,
            "tune": args.tune,
            "registration_s": {"median": statistics.median(reg), "max": max(reg),
                               **distribution(reg),
                               "samples": [round(x, 3) for x in reg]},
            "check_spread_s": distribution([c["spread"] for c in chk]),
            "gossip": gossip_totals(agents),
            "check": {"interval_s": args.interval, "fall": args.fall, "timeout_s": timeout,
                      "detection_bound_s": detection_bound,
                      "detect_median_s": statistics.median(c["detect"] for c in chk),
                      "everywhere_median_s": statistics.median(c["everywhere"] for c in chk),
                      "everywhere_max_s": max(c["everywhere"] for c in chk),
                      "spread_median_s": statistics.median(c["spread"] for c in chk),
                      "spread_max_s": max(c["spread"] for c in chk)},
            "dns": dns,
        }
        if args.trace:
            res["trace"] = trace_analysis(agents, trials)
        if args.json:
            print(json.dumps(res, indent=2))
        else:
            r, c = res["registration_s"], res["check"]
            print(f"\n{args.nodes} agents, profile {args.profile}")
            print(f"registration -> all agents: median {r['median'] * 1000:.0f} ms, "
                  f"max {r['max'] * 1000:.0f} ms (target median <= 1000 ms)")
            print(f"failing check -> gone everywhere: median {c['everywhere_median_s']:.2f} s "
                  f"(owner detected after {c['detect_median_s']:.2f} s; spread median "
                  f"{c['spread_median_s']:.2f} s, max {c['spread_max_s']:.2f} s; target "
                  f"<= detection + 1 s; detection bound {detection_bound:.2f} s)")
            print(f"registration distribution: {res['registration_s'] | {'samples': '...'}}")
            print(f"check spread distribution: {res['check_spread_s']}")
            print(f"gossip: {res['gossip']}")
            if dns:
                print(f"DNS: {dns['qps']:.0f} answers/s from one agent ({dns['answered']} "
                      f"answered, {dns['errors']} errors; target >= 5000/s)")
            if args.trace:
                print(f"trace: {json.dumps(res['trace'])}")
        return 0
    finally:
        if loss is not None:
            loss.close()
        for a in agents:
            if a.proc is not None and a.proc.poll() is None:
                # SIGTERM: a traced agent writes its trace out as it stops.
                a.proc.send_signal(signal.SIGTERM if args.trace else signal.SIGKILL)
        for a in agents:
            if a.proc is not None:
                try:
                    a.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    a.proc.kill()
        health.server.shutdown()
        if not os.environ.get("RUMOR_BENCH_KEEP_LOGS"):
            for f in workdir.iterdir():
                f.unlink()
            workdir.rmdir()


if __name__ == "__main__":
    sys.exit(main())
