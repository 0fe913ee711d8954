#!/usr/bin/env python3
"""Latency-aware balancing on a real network: one instance 20 ms further away.

A lab of four hosts (root): a caller in n0, the service ``web`` on n1, n2 and n3,
each instance a tiny HTTP server in its own namespace behind its own sidecar. In the
second run n3's arriving packets wait 20 ms in the delay line (NFQUEUE), so every
request the caller's sidecar sends it costs 20 ms more, on the wire, not in a
sleeping backend. The client keeps ``--concurrency`` requests in flight through n0's
outbound sidecar for ``--seconds``; reported: each instance's share and the
latency percentiles, both runs, alternated over ``--rounds``.

    sudo python3 bench/lab_proxy.py --rounds 3
"""

from __future__ import annotations

import argparse
import json
import random
import socket
import statistics
import sys
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rumor.simulations.lab.cluster import OUTBOUND_PORT, LabCluster, LabNode
from rumor.simulations.lab.kernel import socket_in, why_not_here
from rumor.simulations.lab.scenarios import cold_start, open_lab
from rumor.simulations.scenarios import Params

BACKEND = ("import http.server, socketserver, sys\n"
           "class H(http.server.BaseHTTPRequestHandler):\n"
           "    protocol_version = 'HTTP/1.1'\n"
           "    def do_GET(self):\n"
           "        body = sys.argv[1].encode()\n"
           "        # One write: headers and body apart would meet Nagle and delayed ACKs.\n"
           "        self.wfile.write(b'HTTP/1.1 200 OK\\r\\nContent-Length: %d\\r\\n\\r\\n%s'\n"
           "                         % (len(body), body))\n"
           "    def log_message(self, *a): pass\n"
           "class S(socketserver.ThreadingMixIn, socketserver.TCPServer):\n"
           "    daemon_threads = True; allow_reuse_address = True\n"
           "S(('127.0.0.1', 8080), H).serve_forever()\n")


async def client(cluster: LabCluster, node: LabNode, seconds: float,
                 out: list[tuple[str, float]]) -> None:
    """One keep-alive connection to the outbound sidecar, one request at a time."""
    sock = trio.socket.from_stdlib_socket(
        socket_in(node.host.netns, socket.AF_INET, socket.SOCK_STREAM))
    await sock.connect(("127.0.0.1", OUTBOUND_PORT))
    end = trio.current_time() + seconds
    async with trio.SocketStream(sock) as stream:
        buf = b""
        while trio.current_time() < end:
            t0 = trio.current_time()
            await stream.send_all(b"GET / HTTP/1.1\r\nHost: web\r\n\r\n")
            while b"\r\n\r\n" not in buf:
                buf += await stream.receive_some(65536)
            head, _, buf = buf.partition(b"\r\n\r\n")
            length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length")))
            while len(buf) < length:
                buf += await stream.receive_some(65536)
            body, buf = buf[:length], buf[length:]
            if not head.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(head.decode(errors="replace"))
            out.append((body.decode(), trio.current_time() - t0))


async def one_run(delayed: bool, args: argparse.Namespace) -> dict[str, Any]:
    services = {f"n{i}": ["--service", "name=web,port=8080"] for i in (1, 2, 3)}
    p = Params(nodes=4, profile="lan", warm=False,
               extra={"family": 4, "node_args": services,
                      "host_delay": {"n3": "fixed:0.020"} if delayed else {}})
    async with open_lab(p) as cluster:
        for i in (1, 2, 3):
            await cluster.spawn(cluster.nodes[i], [sys.executable, "-c", BACKEND, f"n{i}"],
                                f"backend n{i}")
        start = await cold_start(cluster, p, random.Random(1))
        if not start["converged"]:
            raise RuntimeError(f"no convergence: {cluster.convergence_gaps()}")
        await trio.sleep(2.0)  # the catalog's health checks pass
        warm: list[tuple[str, float]] = []
        await client(cluster, cluster.nodes[0], 1.0, warm)
        got: list[tuple[str, float]] = []
        async with trio.open_nursery() as nursery:
            for _ in range(args.concurrency):
                nursery.start_soon(client, cluster, cluster.nodes[0], args.seconds, got)
    lat = sorted(t for _, t in got)

    def pct(q: float) -> float:
        return round(lat[min(len(lat) - 1, int(q * len(lat)))] * 1000, 2)
    return {"delayed": delayed, "requests": len(got),
            "share": {f"n{i}": round(sum(1 for b, _ in got if b == f"n{i}") / len(got), 4)
                      for i in (1, 2, 3)},
            "p50_ms": pct(0.5), "p90_ms": pct(0.9), "p99_ms": pct(0.99),
            "max_ms": round(lat[-1] * 1000, 2), "req_per_s": round(len(got) / args.seconds)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    reason = why_not_here()
    if reason:
        raise SystemExit(reason)
    runs = []
    for r in range(args.rounds):
        for delayed in ((False, True) if r % 2 == 0 else (True, False)):
            res = trio.run(one_run, delayed, args)
            print(json.dumps(res), file=sys.stderr, flush=True)
            runs.append(res)
    if args.json:
        print(json.dumps(runs, indent=2))
        return
    print(f"web on n1, n2, n3; caller n0; {args.concurrency} requests in flight, "
          f"{args.seconds:g} s a run, {args.rounds} rounds (median [min–max])\n")
    print("| n3 | share n1 | share n2 | share n3 | p50 ms | p90 ms | p99 ms | req/s |")
    print("|---|---|---|---|---|---|---|---|")
    for delayed in (False, True):
        rs = [x for x in runs if x["delayed"] == delayed]

        def m(get: Any, rs: list[dict[str, Any]] = rs) -> str:
            xs = [get(x) for x in rs]
            return f"{statistics.median(xs):g} [{min(xs):g}–{max(xs):g}]"
        print(f"| {'+20 ms' if delayed else 'as the others'} | "
              + " | ".join(m(lambda x, i=i: x["share"][f"n{i}"]) for i in (1, 2, 3))
              + f" | {m(lambda x: x['p50_ms'])} | {m(lambda x: x['p90_ms'])} | "
              f"{m(lambda x: x['p99_ms'])} | {m(lambda x: x['req_per_s'])} |")


if __name__ == "__main__":
    main()
