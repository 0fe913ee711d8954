"""What the lab's delay line (``rumor.simulations.lab.delay_line``) adds, and costs.

Two network namespaces joined by a veth (``tests/lab/test_delay_line.py``'s
``NetnsPair``: rltest-dl-bench-a/-b, 10.211.250.0/24), a UDP echo in b, and an
open-loop UDP sender in a (this process, its socket made in a) at a fixed rate. Per
case and rate: round-trip p50/p90/p99/max, lost packets, and the delay line's own CPU
(getrusage of its process, ready to exit) per packet and as a share of one core. The
line holds a's ingress (the echo's replies; ``delay_rules``' default) or, with
``--direction egress``, a's egress (the requests). Cases:

* ``none``: no rule, no delay line (the floor);
* ``fixed:0``: the delay line releasing at once (its own added latency and jitter);
* ``fixed:0.020``, ``uniform:0.015:0.025``: the delays the lab uses.

The cases alternate within each round, in a rotated order, over several rounds (the
VM's CPU steal varies from minute to minute); the table gives the median over rounds
and [min–max]. Needs root.

    python3 bench/delay_line.py [--rounds 3] [--rates 200,2000,5000] [--seconds 2]
                                [--direction ingress|egress] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import select
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from rumor.simulations.lab.delay_line import delay_rules
from tests.lab.test_delay_line import (
    ECHO_PORT,
    V4,
    NetnsPair,
    client,
    ping,
    skip_reason,
)

CASES = ["none", "fixed:0", "fixed:0.020", "uniform:0.015:0.025"]
QUEUE = 3
PAYLOAD = 64
_HDR = struct.Struct("!Iq")  # seq, send time (ns)
SO_SNDBUFFORCE, SO_RCVBUFFORCE = 32, 33


def quantile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * (len(s) - 1) + 0.5))]


def load(sock: socket.socket, rate: float, seconds: float, grace: float = 1.0
         ) -> tuple[list[float], int, float, int]:
    """Open loop: ``rate`` datagrams a second for ``seconds``, each stamped; returns the
    round trips (s), how many were sent, the time from the first send to the last
    reply (or the end of the grace period), and how many times the send buffer was
    full (the packets the delay line holds are charged to the sending socket)."""
    sock.setblocking(False)
    n = int(rate * seconds)
    pad = b"\0" * (PAYLOAD - _HDR.size)
    dest = (V4[1], ECHO_PORT)
    rtts: list[float] = []
    seen = bytearray(n)
    interval = 1.0 / rate
    start = time.perf_counter()
    next_send = start
    sent = 0
    deadline = None
    last = start
    blocked = 0
    while True:
        now = time.perf_counter()
        while sent < n and next_send <= now:
            try:
                sock.sendto(_HDR.pack(sent, time.perf_counter_ns()) + pad, dest)
            except BlockingIOError:  # send buffer full (held packets count against it)
                blocked += 1
                break
            sent += 1
            next_send += interval
        while True:
            try:
                data = sock.recv(2048)
            except BlockingIOError:
                break
            t = time.perf_counter_ns()
            seq, t0 = _HDR.unpack_from(data)
            if seq < n and not seen[seq]:
                seen[seq] = 1
                rtts.append((t - t0) / 1e9)
                last = time.perf_counter()
        if sent == n:
            if len(rtts) == n:
                break
            if deadline is None:
                deadline = time.perf_counter() + grace
            elif time.perf_counter() >= deadline:
                last = deadline
                break
        wait = (next_send - time.perf_counter()) if sent < n else 0.01
        if wait > 0:
            select.select([sock], [], [], wait)
    return rtts, sent, last - start, blocked


def cpu_ns(pid: int) -> int:
    """Time on CPU of a single-threaded process, ns (/proc/PID/schedstat)."""
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0])


def run_case(pair: NetnsPair, case: str, rate: float, seconds: float, seed: int,
             echo_pid: int, direction: str = "ingress") -> dict[str, Any]:
    sock = client(pair, socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 8 << 20)
    sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, 8 << 20)
    assert len(ping(sock, V4[1], 3)) == 3, "the echo does not answer"
    proc = None
    rules = delay_rules(pair.ifa, QUEUE, direction=direction)
    with tempfile.TemporaryDirectory() as tmp:
        stats_file = Path(tmp) / "stats.json"
        try:
            if case != "none":
                for do, _undo in rules:
                    subprocess.run(pair.exec_argv(pair.a, *do), check=True)
                proc = subprocess.Popen(
                    [sys.executable, "-m", "rumor.simulations.lab.delay_line", "--queue",
                     f"{pair.a}:{QUEUE}:{case}", "--seed", str(seed), "--stats-file",
                     str(stats_file)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
                assert proc.stdout is not None
                if proc.stdout.readline().strip() != b"ready":
                    raise RuntimeError(f"the delay line did not start for {case}")
            echo0 = cpu_ns(echo_pid)
            rtts, sent, busy, blocked = load(sock, rate, seconds)
            echo_cpu = (cpu_ns(echo_pid) - echo0) / 1e9
        finally:
            if proc is not None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=10)
            if case != "none":
                for _do, undo in rules:
                    subprocess.run(pair.exec_argv(pair.a, *undo), check=False)
            sock.close()
        stats = json.loads(stats_file.read_text()) if proc is not None else None
    out: dict[str, Any] = {
        "case": case, "rate": rate, "sent": sent, "lost": sent - len(rtts),
        "p50_ms": quantile(rtts, 0.5) * 1e3, "p90_ms": quantile(rtts, 0.9) * 1e3,
        "p99_ms": quantile(rtts, 0.99) * 1e3, "max_ms": max(rtts, default=float("nan")) * 1e3,
        "seconds": busy, "send_blocked": blocked,
        # The reference for the delay line's cost: a minimal Python UDP echo's CPU.
        "echo_us_per_packet": echo_cpu / max(len(rtts), 1) * 1e6,
    }
    if stats is not None:
        pkts = stats["packets"] or 1
        out.update({
            "dl_packets": stats["packets"],
            "dl_cpu_us_per_packet": stats["cpu_seconds"] / pkts * 1e6,
            "dl_user_us_per_packet": stats["cpu_user_seconds"] / pkts * 1e6,
            "dl_core_pct": stats["cpu_seconds"] / busy * 100,
            "dl_lateness_p50_us": stats["lateness_seconds"]["p50"] * 1e6,
            "dl_lateness_p99_us": stats["lateness_seconds"]["p99"] * 1e6,
            "dl_lateness_max_us": stats["lateness_seconds"]["max"] * 1e6,
            "dl_held_max": max(q["held_max"] for q in stats["queues"]),
            "dl_missed": sum(q["missed"] for q in stats["queues"]),
        })
    return out


METRICS = ["p50_ms", "p90_ms", "p99_ms", "max_ms", "lost", "send_blocked", "added_p50_ms",
           "echo_us_per_packet", "dl_cpu_us_per_packet",
           "dl_user_us_per_packet", "dl_core_pct", "dl_lateness_p50_us",
           "dl_lateness_p99_us", "dl_held_max", "dl_missed"]


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    # Paired with the same round's "none" run at the same rate: what the case adds.
    floor = {(r["round"], r["rate"]): r["p50_ms"] for r in runs if r["case"] == "none"}
    for r in runs:
        if (r["round"], r["rate"]) in floor:
            r["added_p50_ms"] = r["p50_ms"] - floor[(r["round"], r["rate"])]
    rows = []
    keys = sorted({(str(r["case"]), float(r["rate"])) for r in runs},
                  key=lambda k: (k[1], CASES.index(k[0])))
    for case, rate in keys:
        mine = [r for r in runs if r["case"] == case and r["rate"] == rate]
        row: dict[str, Any] = {"case": case, "rate": rate, "rounds": len(mine)}
        for m in METRICS:
            vals = [float(r[m]) for r in mine if m in r]
            if vals:
                row[m] = {"median": statistics.median(vals), "min": min(vals),
                          "max": max(vals)}
        row["lost_total"] = sum(int(r["lost"]) for r in mine)
        row["sent_total"] = sum(int(r["sent"]) for r in mine)
        rows.append(row)
    return rows


def _fmt(cell: object, digits: int) -> str:
    if not isinstance(cell, dict):
        return "–"
    med, lo, hi = cell["median"], cell["min"], cell["max"]
    return f"{med:.{digits}f} [{lo:.{digits}f}–{hi:.{digits}f}]"


def table(rows: list[dict[str, Any]]) -> str:
    head = ("| rate/s | case | RTT p50 ms | added p50 ms | p90 ms | p99 ms | max ms | lost | "
            "DL CPU µs/pkt (user) | DL % core | DL lateness p50/p99 µs | echo µs/pkt |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        user = r.get("dl_user_us_per_packet")
        cpu = "–" if "dl_cpu_us_per_packet" not in r else (
            f"{_fmt(r['dl_cpu_us_per_packet'], 0)} ({_fmt(user, 0).split(' ')[0]})")
        late = "–"
        if isinstance(r.get("dl_lateness_p50_us"), dict):
            late = (f"{r['dl_lateness_p50_us']['median']:.0f} / "
                    f"{r['dl_lateness_p99_us']['median']:.0f}")
        lines.append(
            f"| {r['rate']:,.0f} | {r['case']} | {_fmt(r['p50_ms'], 3)} | "
            f"{_fmt(r.get('added_p50_ms'), 3) if r['case'] != 'none' else '–'} | "
            f"{_fmt(r['p90_ms'], 3)} | {_fmt(r['p99_ms'], 2)} | {_fmt(r['max_ms'], 1)} | "
            f"{r['lost_total']}/{r['sent_total']} | {cpu} | {_fmt(r.get('dl_core_pct'), 1)} "
            f"| {late} | {r['echo_us_per_packet']['median']:.0f} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rates", default="200,2000,5000")
    ap.add_argument("--seconds", type=float, default=2.0, help="sending time per run")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--direction", choices=["ingress", "egress"], default="ingress",
                    help="hold a's incoming replies (default) or its outgoing requests")
    ap.add_argument("--json", action="store_true", help="print JSON instead of the table")
    args = ap.parse_args()
    reason = skip_reason()
    if reason is not None:
        print(f"cannot run: {reason}", file=sys.stderr)
        return 2
    rates = [float(x) for x in args.rates.split(",")]
    cases = args.cases.split(",")
    pair = NetnsPair("bench")
    echo = None
    runs: list[dict[str, Any]] = []
    t0 = time.time()
    try:
        echo = pair.start_echo()
        for rnd in range(args.rounds):
            order = cases[rnd % len(cases):] + cases[:rnd % len(cases)]
            for rate in rates:
                for case in order:
                    r = run_case(pair, case, rate, args.seconds, seed=rnd, echo_pid=echo.pid,
                                 direction=args.direction)
                    r["round"] = rnd
                    runs.append(r)
                    print(f"round {rnd} {rate:,.0f}/s {case}: p50 {r['p50_ms']:.3f} ms "
                          f"p99 {r['p99_ms']:.3f} ms lost {r['lost']}", file=sys.stderr)
    finally:
        if echo is not None:
            echo.kill()
            echo.wait()
        pair.close()
    rows = summarize(runs)
    meta = {"rounds": args.rounds, "rates": rates, "seconds": args.seconds,
            "direction": args.direction,
            "elapsed_s": time.time() - t0, "cpus": os.cpu_count(),
            "loadavg": os.getloadavg()}
    if args.json:
        print(json.dumps({"meta": meta, "rows": rows, "runs": runs}, indent=1))
    else:
        print(table(rows))
        print(f"\n{args.direction}, {args.rounds} rounds, {args.seconds:g} s of sending per run, "
              f"load average at the end {meta['loadavg'][0]:.2f} on {meta['cpus']} CPUs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
