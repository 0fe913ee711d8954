#!/usr/bin/env python3
"""gRPC unary calls through the sidecar pair: CPU per call and added latency, beside
HTTP/1.1 requests through the same pair in the same run.

One callee agent serves two services behind its inbound listener: ``greet``, a grpcio
server declared ``protocol=grpc`` (a generic unary handler echoing 16 bytes), and
``web``, the harness's HTTP/1.1 backend (``../shared/anchors/proxy/backend.py``). A
caller agent's outbound listener takes both: gRPC as h2c with ``greet`` as the
authority, HTTP/1.1 with ``Host: web``. Each in its own process; the load loops run in
this one (grpcio's sync stubs; ``http.client`` keep-alive connections), one thread per
concurrent caller.

Per round and per case (``grpc`` / ``http``, concurrency 1 and 16) the loop runs
``--seconds`` through the pair and, for the latency baseline, as long straight to the
server (``direct``). Measured: calls per second, p50/p99 latency, and the CPU the two
agents used (``/proc/PID/stat`` utime+stime of both) per call. Rounds alternate the
order of the cases (ABBA) so drift hits every case alike; each figure is the median
over rounds with its range.

``--old-root DIR`` adds the HTTP/1.1 cases through a pair of the build in DIR (a
worktree of the commit before this issue), run by the same interpreter with DIR first
on ``sys.path`` (checked: ``rumor`` must import from DIR): CPU per request of the new
build over the old, paired within each round (bar: ≤ 3 % more).

    python3 bench/grpc_cost.py --rounds 4 --seconds 4 --old-root /work/base-eb2335a \\
        --results-dir /tmp/grpc-bench

Writes ``round-N.json`` and ``summary.json`` under ``--results-dir`` and prints a
Markdown table. Agents run the LAN profile at log level warning.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent import futures
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
HOST = "127.0.0.1"
METHOD = "/greet.Greeter/Echo"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


# ---- the gRPC server (its own process: ``--serve-grpc PORT``) ----------------------------


def serve_grpc(port: int) -> None:
    import grpc

    def echo(request: bytes, context: Any) -> bytes:
        return request

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=32))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "greet.Greeter", {"Echo": grpc.unary_unary_rpc_method_handler(echo)}),))
    server.add_insecure_port(f"{HOST}:{port}")
    server.start()
    server.wait_for_termination()


# ---- processes ----------------------------------------------------------------------------


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return total / CLK_TCK


class Pair:
    """A caller and a callee agent of the build at ``root`` (None: this one)."""

    def __init__(self, work: Path, label: str, grpc_port: int, http_port: int,
                 root: Path | None) -> None:
        self.label = label
        self.out_port = free_port()
        env = dict(os.environ)
        if root is not None:
            # ``rumor`` from the old worktree: a folder named rumor -> the worktree.
            shim = work / f"{label}-path"
            shim.mkdir(exist_ok=True)
            if not (shim / "rumor").exists():
                (shim / "rumor").symlink_to(root.resolve())
            env["PYTHONPATH"] = str(shim)
            got = subprocess.run([sys.executable, "-c", "import rumor.proxy.outbound as m;"
                                  "print(m.__file__)"], env=env, capture_output=True,
                                 text=True, check=True).stdout.strip()
            if not got.startswith(str(shim)):
                raise SystemExit(f"{label}: rumor imports from {got}, not {root}")
        base = [sys.executable, "-m", "rumor.cli", "agent", "--profile", "lan",
                "--log-level", "warning"]
        caller_bind, self.api = free_port(), free_port()
        callee_api = free_port()
        services = [f"name=web,id=web-1,port={http_port}"]
        if root is None:
            services.append(f"name=greet,id=greet-1,port={grpc_port},protocol=grpc")
        self.procs = [
            subprocess.Popen([*base, "--name", f"{label}-caller", "--bind",
                              f"{HOST}:{caller_bind}", "--api", f"{HOST}:{self.api}",
                              "--outbound", f"{HOST}:{self.out_port}", "--identity", "bench"],
                             env=env, stdout=open(work / f"{label}-caller.log", "ab"),  # noqa: SIM115
                             stderr=subprocess.STDOUT)]
        time.sleep(0.5)
        self.procs.append(subprocess.Popen(
            [*base, "--name", f"{label}-callee", "--bind", f"{HOST}:{free_port()}",
             "--api", f"{HOST}:{callee_api}", "--inbound", f"{HOST}:{free_port()}",
             "--join", f"{HOST}:{caller_bind}",
             *[a for s in services for a in ("--service", s)]],
            env=env, stdout=open(work / f"{label}-callee.log", "ab"),  # noqa: SIM115
            stderr=subprocess.STDOUT))

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def close(self) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()


# ---- load loops ---------------------------------------------------------------------------


def grpc_loop(port: int, authority: str | None) -> Callable[[], Callable[[], None]]:
    """A factory of per-thread callers: one channel shared by all threads (as an
    application holds one), a call each."""
    import grpc

    options = [("grpc.enable_retries", 0)]
    if authority:
        options.append(("grpc.default_authority", authority))
    channel = grpc.insecure_channel(f"{HOST}:{port}", options=options)
    stub = channel.unary_unary(METHOD)
    payload = b"0123456789abcdef"

    def make() -> Callable[[], None]:
        def call() -> None:
            if stub(payload, timeout=5) != payload:
                raise RuntimeError("bad echo")
        return call
    return make


def http_loop(port: int, host: str) -> Callable[[], Callable[[], None]]:
    def make() -> Callable[[], None]:
        conn = http.client.HTTPConnection(HOST, port, timeout=5)

        def call() -> None:
            conn.request("GET", "/", headers={"host": host})
            r = conn.getresponse()
            r.read()
            if r.status != 200:
                raise RuntimeError(f"status {r.status}")
        return call
    return make


def run(make: Callable[[], Callable[[], None]], concurrency: int, seconds: float,
        pids: list[int]) -> dict[str, float]:
    """``concurrency`` threads calling for ``seconds``: calls/s, p50/p99 ms, and the
    CPU µs per call of ``pids``."""
    callers = [make() for _ in range(concurrency)]
    for c in callers:  # warm: connections open, first call paid
        c()
    lat: list[list[float]] = [[] for _ in callers]
    errors = [0]
    start = threading.Barrier(concurrency + 1)
    end_at = [0.0]

    def worker(i: int) -> None:
        call, mine = callers[i], lat[i]
        start.wait()
        while True:
            t0 = time.perf_counter()
            if t0 >= end_at[0]:
                return
            try:
                call()
            except Exception:
                errors[0] += 1
            mine.append(time.perf_counter() - t0)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
    for t in threads:
        t.start()
    cpu0 = cpu_seconds(pids) if pids else 0.0
    t0 = time.perf_counter()
    end_at[0] = t0 + seconds
    start.wait()
    for t in threads:
        t.join()
    took = time.perf_counter() - t0
    cpu = (cpu_seconds(pids) - cpu0) if pids else 0.0
    every = sorted(x for xs in lat for x in xs)
    n = len(every)
    return {"calls": n, "errors": errors[0], "per_second": n / took,
            "p50_ms": every[n // 2] * 1e3, "p99_ms": every[min(n - 1, n * 99 // 100)] * 1e3,
            "cpu_us_per_call": cpu / n * 1e6 if pids else 0.0}


def wait_ready(check: Callable[[], None], what: str, timeout: float = 30) -> None:
    t0 = time.monotonic()
    while True:
        try:
            check()
            return
        except Exception as e:
            if time.monotonic() - t0 > timeout:
                raise SystemExit(f"{what} not ready: {e}") from None
            time.sleep(0.3)


# ---- the run ------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--old-root", type=Path, default=None)
    ap.add_argument("--results-dir", type=Path, default=None)
    ap.add_argument("--serve-grpc", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve_grpc is not None:
        serve_grpc(args.serve_grpc)
        return 0
    work = Path(tempfile.mkdtemp(prefix="grpc-cost-"))
    out = args.results_dir or work
    out.mkdir(parents=True, exist_ok=True)
    grpc_port, http_port = free_port(), free_port()
    backend = ROOT.parent / "shared" / "anchors" / "proxy" / "backend.py"
    if not backend.is_file():
        backend = Path("/work/shared/anchors/proxy/backend.py")
    servers = [
        subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--serve-grpc",
                          str(grpc_port)]),
        subprocess.Popen([sys.executable, str(backend), "--port", str(http_port),
                          "--name", "web-1"], stdout=subprocess.DEVNULL),
    ]
    pairs: list[Pair] = []
    try:
        new = Pair(work, "new", grpc_port, http_port, None)
        pairs.append(new)
        old = Pair(work, "old", grpc_port, http_port, args.old_root) \
            if args.old_root is not None else None
        if old is not None:
            pairs.append(old)
        # cases: name -> (factory, pids whose CPU counts)
        cases: dict[str, tuple[Callable[[], Callable[[], None]], list[int]]] = {
            "grpc-direct": (grpc_loop(grpc_port, None), []),
            "grpc-pair": (grpc_loop(new.out_port, "greet"), new.pids),
            "http-direct": (http_loop(http_port, "web"), []),
            "http-pair": (http_loop(new.out_port, "web"), new.pids),
        }
        if old is not None:
            cases["http-pair-old"] = (http_loop(old.out_port, "web"), old.pids)
        for name, (make, _) in cases.items():
            wait_ready(lambda make=make: make()(), name)  # type: ignore[misc]
        time.sleep(2.0)  # gossip settles; the agents' start-up CPU is behind us
        order = list(cases)
        rounds: list[dict[str, Any]] = []
        for r in range(args.rounds):
            seq = order if r % 4 in (0, 3) else order[::-1]  # ABBA
            row: dict[str, Any] = {}
            for c in (1, 16):
                for name in seq:
                    make, pids = cases[name]
                    row[f"{name}/c{c}"] = run(make, c, args.seconds, pids)
            rounds.append(row)
            (out / f"round-{r}.json").write_text(json.dumps(row, indent=1))
            print(f"round {r}: " + ", ".join(
                f"{k} {v['per_second']:.0f}/s p50 {v['p50_ms']:.2f}ms "
                f"cpu {v['cpu_us_per_call']:.0f}us" for k, v in row.items()), file=sys.stderr)
        summary = summarize(rounds)
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        print(table(summary))
    finally:
        for p in pairs:
            p.close()
        for s in servers:
            s.terminate()
            s.wait(timeout=5)
    return 0


def _mr(vals: list[float], fmt: str) -> str:
    return f"{statistics.median(vals):{fmt}} [{min(vals):{fmt}}–{max(vals):{fmt}}]"


def summarize(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in rounds[0]:
        out[key] = {m: [r[key][m] for r in rounds] for m in rounds[0][key]}
    for kind in ("grpc", "http"):
        for c in (1, 16):
            pair, direct = f"{kind}-pair/c{c}", f"{kind}-direct/c{c}"
            out[f"{kind}/c{c}/added_p50_ms"] = [
                r[pair]["p50_ms"] - r[direct]["p50_ms"] for r in rounds]
    for c in (1, 16):
        if f"http-pair-old/c{c}" in rounds[0]:
            out[f"http/c{c}/cpu_new_over_old"] = [
                r[f"http-pair/c{c}"]["cpu_us_per_call"]
                / r[f"http-pair-old/c{c}"]["cpu_us_per_call"] for r in rounds]
    return out


def table(s: dict[str, Any]) -> str:
    lines = ["| case | calls/s | p50 ms | p99 ms | agents' CPU µs/call | added p50 ms |",
             "|---|---|---|---|---|---|"]
    for key in s:
        if "/" not in key or key.count("/") > 1:
            continue
        kind = key.split("-")[0]
        c = key.rsplit("/", 1)[1]
        m = s[key]
        cpu = _mr(m["cpu_us_per_call"], ".0f") if max(m["cpu_us_per_call"]) else "–"
        added = _mr(s[f"{kind}/{c}/added_p50_ms"], ".3f") if "-pair/" in key \
            and "old" not in key else "–"
        lines.append(f"| {key} | {_mr(m['per_second'], '.0f')} | {_mr(m['p50_ms'], '.3f')} "
                     f"| {_mr(m['p99_ms'], '.3f')} | {cpu} | {added} |")
    for c in ("c1", "c16"):
        k = f"http/{c}/cpu_new_over_old"
        if k in s:
            lines.append(f"\nHTTP/1.1 CPU per request, new/old, {c} (paired per round): "
                         f"{_mr(s[k], '.3f')}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
