#!/usr/bin/env python3
"""CPU of idle gossip with and without encryption (issue 7: at most +20% per agent).

Starts ``--nodes`` real agents on 127.0.0.1 (LAN profile), once with plaintext gossip
and once with ``--keyring``, alternating for ``--rounds`` rounds; in each, waits for
the cluster to converge and settle, then reads every agent's CPU time (utime + stime
from /proc) over ``--seconds`` of idle gossip.

    python bench/keyring_cost.py --nodes 10 --seconds 60 --rounds 2

Prints one JSON line per run and a summary line with the ratio per round.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """Time on CPU in ns resolution (schedstat), not in 10 ms ticks (stat): an idle
    agent uses about 0.1 s a minute, ten ticks."""
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0]) / 1e9


def alive_count(api: str) -> int:
    try:
        with urllib.request.urlopen(f"http://{api}/v1/members", timeout=2) as r:
            return sum(1 for m in json.loads(r.read()) if m["status"] == "alive")
    except OSError:
        return 0


def run(nodes: int, seconds: float, settle: float, keyring: Path | None,
        work: Path) -> dict[str, object]:
    procs: list[subprocess.Popen[bytes]] = []
    apis: list[str] = []
    seed = ""
    try:
        for i in range(nodes):
            bind, api = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
            argv = [sys.executable, "-m", "rumor.cli", "agent", "--name", f"n{i}",
                    "--bind", bind, "--api", api, "--log-level", "warning"]
            if keyring is not None:
                argv += ["--keyring", str(keyring)]
            if seed:
                argv += ["--join", seed]
            log = open(work / f"n{i}.log", "ab")  # noqa: SIM115
            procs.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT))
            apis.append(api)
            if not seed:
                seed = bind
                deadline = time.monotonic() + 20
                while alive_count(api) < 1 and time.monotonic() < deadline:
                    time.sleep(0.1)
        deadline = time.monotonic() + 60
        while any(alive_count(a) < nodes for a in apis):
            if time.monotonic() > deadline:
                raise RuntimeError("cluster did not converge in 60 s")
            time.sleep(0.2)
        time.sleep(settle)  # join traffic and start-up work out of the way
        before = [cpu_seconds(p.pid) for p in procs]
        t0 = time.monotonic()
        time.sleep(seconds)
        wall = time.monotonic() - t0
        after = [cpu_seconds(p.pid) for p in procs]
        per_agent = [(b - a) / wall * 60 for a, b in zip(before, after, strict=True)]
        return {"encrypted": keyring is not None, "nodes": nodes, "seconds": round(wall, 1),
                "cpu_s_per_min_per_agent": round(statistics.mean(per_agent), 4),
                "min": round(min(per_agent), 4), "max": round(max(per_agent), 4)}
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=10)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--settle", type=float, default=10.0)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="rumor-keyring-cost-") as tmp:
        work = Path(tmp)
        ring = work / "keyring"
        ring.write_text(base64.b64encode(os.urandom(32)).decode() + "\n")
        ratios = []
        for r in range(args.rounds):
            plain = run(args.nodes, args.seconds, args.settle, None, work)
            keyed = run(args.nodes, args.seconds, args.settle, ring, work)
            for rec in (plain, keyed):
                print(json.dumps({"round": r, **rec}), flush=True)
            ratios.append(float(keyed["cpu_s_per_min_per_agent"])  # type: ignore[arg-type]
                          / float(plain["cpu_s_per_min_per_agent"]))  # type: ignore[arg-type]
        print(json.dumps({"summary": "encrypted / plaintext CPU per agent, idle",
                          "ratios": [round(x, 3) for x in ratios],
                          "median": round(statistics.median(ratios), 3),
                          "target": 1.2}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
