#!/usr/bin/env python3
"""`rumor stat --all` against the load generator over the same window (issue 29).

Per round: the shared harness's backend (``backend.py``), a rumor sidecar pair
(``bench/proxy_pair.py``: load → caller's outbound → callee's inbound → backend), and
the harness's open-loop ``loadgen.py`` at a fixed rate whose measured part starts on a
5-second wall-clock boundary and lasts a whole number of buckets. Then ``rumor stat
--all --listener outbound --window W --end E`` asks every agent for exactly that
window, and its requests/s and p50/p99 are set beside what the generator measured.

The two latencies are taken at different points: the generator's from its write of
the request to the last response byte, the caller sidecar's from the request's arrival
to the response head. The difference is the client's loopback and parsing, a few
hundred µs; the slowed backend (``--delay-ms``/``--slow-*``) makes the figure one of the
sketches and the merge, not of that gap.

    python3 bench/stat_vs_loadgen.py --rounds 3 --rate 500 --seconds 30 --workdir /tmp/svl
    python3 bench/stat_vs_loadgen.py --rounds 3 --rate 500 --seconds 30 --delay-ms 5 \\
        --slow-fraction 0.05 --slow-ms 20 --workdir /tmp/svl-slow

Stdlib only; the harness is found as ``bench/pipeline_ab.py`` finds it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pipeline_ab import find_harness

HERE = Path(__file__).resolve().parent
BUCKET = 5.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ok(port: int, timeout: float = 30.0) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            req = urllib.request.Request(f"http://127.0.0.1:{port}/", headers={"host": "bench"})
            with urllib.request.urlopen(req, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"nothing answered 200 on 127.0.0.1:{port} within {timeout:g} s")


def one_round(args: argparse.Namespace, harness: Path, work: Path) -> dict[str, object]:
    work.mkdir(parents=True, exist_ok=True)
    bport, listen = free_port(), free_port()
    backend = subprocess.Popen(
        [sys.executable, str(harness / "backend.py"), "--port", str(bport), "--name", "b1",
         "--delay-ms", str(args.delay_ms), "--slow-fraction", str(args.slow_fraction),
         "--slow-ms", str(args.slow_ms), "--seed", "7"],
        stdout=open(work / "backend.log", "wb"), stderr=subprocess.STDOUT,  # noqa: SIM115
        start_new_session=True)
    env = {**os.environ, "BENCH_LISTEN": f"127.0.0.1:{listen}", "BENCH_SERVICE": "bench",
           "BENCH_WORKDIR": str(work), "BENCH_BACKENDS": f"127.0.0.1:{bport}"}
    pair = subprocess.Popen([args.python, str(HERE / "proxy_pair.py")], env=env,
                            stdout=open(work / "pair.log", "wb"),  # noqa: SIM115
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_ok(listen)
        apis = json.loads((work / "apis.json").read_text())
        # The measured part starts on a bucket boundary, after the warm-up.
        start = (math.floor((time.time() + args.warmup + 1.0) / BUCKET) + 1) * BUCKET
        time.sleep(max(0.0, start - args.warmup - time.time()))
        gen = subprocess.run(
            [sys.executable, str(harness / "loadgen.py"), "--port", str(listen),
             "--host-header", "bench", "--rate", str(args.rate), "--duration",
             str(args.seconds), "--warmup", str(args.warmup), "--json"],
            capture_output=True, text=True, timeout=args.seconds + args.warmup + 60)
        if gen.returncode != 0:
            raise SystemExit(f"loadgen failed: {gen.stderr}")
        lg = json.loads(gen.stdout)
        end = start + args.seconds
        time.sleep(max(0.0, end + 0.5 - time.time()))
        stat = subprocess.run(
            [args.python, "-m", "rumor.cli", "stat", "--all", "--listener", "outbound",
             "--window", f"{args.seconds:g}s", "--end", str(end), "--json", "--api",
             apis[0]], capture_output=True, text=True, timeout=60)
        if stat.returncode != 0:
            raise SystemExit(f"rumor stat failed: {stat.stderr}")
        doc = json.loads(stat.stdout)
        [row] = [r for r in doc["rows"] if r["service"] == "bench"]
        lg_rps = lg["requests_measured"] / args.seconds
        lat = lg["latency_ms"]
        return {"agents": len(doc["agents"]), "missing": doc["missing"],
                "loadgen_rps": round(lg_rps, 2), "stat_rps": row["rps"],
                "rps_ratio": round(row["rps"] / lg_rps, 4),
                "loadgen_p50_ms": lat["p50"], "stat_p50_ms": row["p50_ms"],
                "loadgen_p99_ms": lat["p99"], "stat_p99_ms": row["p99_ms"],
                "p99_ratio": round(row["p99_ms"] / lat["p99"], 4),
                "loadgen_requests": lg["requests_measured"], "stat_requests": row["requests"],
                "send_lag_p99_ms": lg["send_lag_ms"].get("p99")}
    finally:
        for p in (pair, backend):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
        for p in (pair, backend):
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rate", type=float, default=500.0)
    ap.add_argument("--seconds", type=int, default=30, help="measured; a multiple of 5")
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--delay-ms", type=float, default=0.0)
    ap.add_argument("--slow-fraction", type=float, default=0.0)
    ap.add_argument("--slow-ms", type=float, default=0.0)
    ap.add_argument("--python", default=sys.executable, help="the python with rumor")
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--harness")
    args = ap.parse_args()
    if args.seconds % BUCKET:
        ap.error("--seconds must be a multiple of 5")
    harness = find_harness(args.harness)
    rounds = []
    for i in range(args.rounds):
        r = one_round(args, harness, Path(args.workdir) / f"round{i}")
        print(json.dumps(r), flush=True)
        rounds.append(r)
    for k in ("rps_ratio", "p99_ratio"):
        v = [float(r[k]) for r in rounds]  # type: ignore[arg-type]
        print(f"{k}: median {statistics.median(v):.4f} [{min(v):.4f}–{max(v):.4f}] "
              f"over {len(v)} rounds")
    return 0


if __name__ == "__main__":
    sys.exit(main())
