#!/usr/bin/env python3
"""Real agents with and without signed membership (issue 27): idle CPU, gossip bytes
and the join time of one more agent, for several builds in the same run.

Each *variant* is a build plus its identity options; every round starts, for each
variant in turn (alternating, so the VM's steal time hits them alike), ``--nodes``
agents on 127.0.0.1 (``--profile lan``, each with its own ``--data-dir``, agent i
joining agent 0), waits until every agent lists all of them alive, lets them settle
``--settle`` s, then

* **idle**: over ``--window`` s reads each agent's CPU (``/proc/PID/stat`` utime +
  stime), the UDP payload bytes it sent (``bytes_out`` of ``/v1/health``'s stats) and
  the payload bytes it sent on its sockets by kind (``bench/sockcount/
  sitecustomize.py``, loaded through ``PYTHONPATH`` into every agent: UDP, gossip TCP
  = push-pull and TCP pings, API answers apart), per agent;
* **join**: ``--joins`` times starts one more agent with ``--join`` one seed (agent
  1) and times from its spawn until every agent lists it alive and it lists all of
  them alive (also: until its API answered, the interpreter's start); it then leaves
  (SIGTERM) before the next.

Variants (``--variants``, comma-separated):

* ``before``: the build of ``--before-python`` (the tree before issue 27), no
  identity options;
* ``off``: this build, ``--node-identity off``;
* ``ca``: this build, ``--node-identity require --node-ca CA/ca.crt`` with a
  credential from ``rumor ca credential`` for every agent (``rumor ca init`` once);
* ``tofu``: this build, ``--node-identity require --node-tofu``.

::

    python bench/signed_agents.py --nodes 30 --rounds 3 \\
        --before-python /tmp/base-lead/.venv/bin/python --out /tmp/b27/agents.json

Prints one JSON line per (round, variant) and, at the end, medians and ranges over
rounds of the per-agent medians.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"
CLK = os.sysconf("SC_CLK_TCK")
SOCKCOUNT = Path(__file__).resolve().parent / "sockcount"


class Agent:
    def __init__(self, python: str, name: str, port: int, api: int, data_dir: Path,
                 extra: list[str], log: Path) -> None:
        self.python, self.name, self.port, self.api = python, name, port, api
        self.data_dir, self.extra, self.log = data_dir, extra, log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, seed: Agent | None) -> None:
        argv = [self.python, "-m", "rumor.cli", "agent", "--name", self.name,
                "--bind", f"{HOST}:{self.port}", "--api", f"{HOST}:{self.api}",
                "--profile", "lan", "--log-format", "json",
                "--data-dir", str(self.data_dir), *self.extra]
        if seed is not None:
            argv += ["--join", f"{HOST}:{seed.port}"]
        env = dict(os.environ, PYTHONPATH=str(SOCKCOUNT),
                   RUMOR_BENCH_SOCKCOUNT=str(self.log.parent))
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL,
                                     stderr=self.log.open("ab"), cwd="/", env=env)

    def sent(self) -> dict[str, float]:
        """Bytes sent so far by kind (``bench/sockcount``), with the time of the count."""
        assert self.proc is not None
        p = self.log.parent / f"{self.proc.pid}.json"
        try:
            return dict(json.loads(p.read_text()))
        except (OSError, ValueError):
            return {}

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(f"http://{HOST}:{self.api}{path}", timeout=2) as r:
            return json.loads(r.read())

    def alive(self) -> set[str]:
        try:
            data = self.get("/v1/members")
        except (OSError, ValueError):
            return set()
        if isinstance(data, dict):
            data = data.get("members", [])
        return {m["name"] for m in data if m.get("status") == "alive"}

    def cpu_s(self) -> float:
        assert self.proc is not None
        f = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(f[11]) + int(f[12])) / CLK

    def udp_out(self) -> int:
        return int(self.get("/v1/health").get("stats", {}).get("bytes_out", 0))

    def rss_kib(self) -> int:
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    def stop(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def wait_until(cond: Any, timeout: float, poll: float = 0.05) -> float | None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if cond():
            return time.monotonic() - t0
        time.sleep(poll)
    return None


def variant_setup(variant: str, args: argparse.Namespace, work: Path,
                  names: list[str]) -> tuple[str, dict[str, list[str]]]:
    """The interpreter and each agent's extra options; makes data dirs and credentials."""
    me = sys.executable
    opts: dict[str, list[str]] = {}
    for n in names:
        (work / n).mkdir(parents=True, exist_ok=True)
    if variant == "before":
        return args.before_python, {n: [] for n in names}
    if variant == "off":
        return me, {n: ["--node-identity", "off"] for n in names}
    if variant == "tofu":
        return me, {n: ["--node-identity", "require", "--node-tofu"] for n in names}
    if variant == "ca":
        ca = work / "ca"
        rumor = [me, "-m", "rumor.cli"]
        subprocess.run([*rumor, "ca", "init", "--dir", str(ca), "--cluster", "bench"],
                       check=True, capture_output=True)
        for n in names:
            subprocess.run([*rumor, "ca", "credential", "--dir", str(ca), "--node", n,
                            "--data-dir", str(work / n)], check=True, capture_output=True)
            opts[n] = ["--node-identity", "require", "--node-ca", str(ca / "ca.crt")]
        return me, opts
    raise SystemExit(f"unknown variant {variant!r}")


def one_round(variant: str, rnd: int, args: argparse.Namespace, port0: int) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix=f"sa-{variant}-", dir=args.workdir))
    n = args.nodes
    names = [f"a{i:02d}" for i in range(n)] + [f"j{k}" for k in range(args.joins)]
    python, opts = variant_setup(variant, args, work, names)
    agents = [Agent(python, nm, port0 + 2 * i, port0 + 2 * i + 1, work / nm, opts[nm],
                    work / f"{nm}.log") for i, nm in enumerate(names)]
    core, joiners = agents[:n], agents[n:]
    pool = ThreadPoolExecutor(16)
    out: dict[str, Any] = {"variant": variant, "round": rnd, "nodes": n}
    try:
        t0 = time.monotonic()
        core[0].start(None)
        wait_until(lambda: core[0].name in core[0].alive(), 30)
        for a in core[1:]:
            a.start(core[0])
            time.sleep(args.spawn_gap)
        want = {a.name for a in core}

        def converged(among: list[Agent], want: set[str]) -> bool:
            return all(want <= s for s in pool.map(lambda a: a.alive(), among))
        took = wait_until(lambda: converged(core, want), 120, 0.5)
        out["converged_after_spawn_s"] = round(time.monotonic() - t0, 1)
        if took is None:
            out["error"] = "did not converge"
            return out
        time.sleep(args.settle)
        # ---- idle
        c0 = [a.cpu_s() for a in core]
        s0 = [a.sent() for a in core]
        u0 = list(pool.map(lambda a: a.udp_out(), core))
        t1 = time.monotonic()
        time.sleep(args.window)
        u1 = list(pool.map(lambda a: a.udp_out(), core))
        dt = time.monotonic() - t1
        c1 = [a.cpu_s() for a in core]
        time.sleep(5.5)  # one more count, written after the window's end
        s1 = [a.sent() for a in core]
        cpu = [(b - a) / dt * 60 for a, b in zip(c0, c1, strict=True)]
        udp = [(b - a) / dt for a, b in zip(u0, u1, strict=True)]

        def rate(kind: str) -> float:
            xs = [(b[kind] - a[kind]) / (b["t"] - a["t"]) for a, b in zip(s0, s1, strict=True)
                  if a and b and b["t"] > a["t"]]
            return round(statistics.median(xs), 1) if xs else float("nan")
        out.update(window_s=round(dt, 1),
                   cpu_s_per_min={"median": round(statistics.median(cpu), 4),
                                  "mean": round(statistics.mean(cpu), 4),
                                  "max": round(max(cpu), 4)},
                   udp_bytes_out_per_s=round(statistics.median(udp), 1),
                   sent_udp_per_s=rate("udp"), sent_tcp_per_s=rate("tcp"),
                   sent_api_per_s=rate("api"),
                   rss_mib=round(statistics.median(a.rss_kib() for a in core) / 1024, 1),
                   still_converged=converged(core, want))
        # ---- joins
        joins = []
        for j in joiners:
            t0 = time.monotonic()
            j.start(core[1])
            api = wait_until(lambda j=j: bool(j.alive()), 30, 0.02)
            everyone = {*want, j.name}
            full = wait_until(lambda j=j, everyone=everyone: converged([*core, j], everyone),
                              60, 0.05)
            done = time.monotonic() - t0
            joins.append({"api_up_s": None if api is None else round(api, 3),
                          "all_list_it_s": None if full is None else round(done, 3)})
            j.stop(signal.SIGTERM)
            time.sleep(2)
        out["joins"] = joins
        return out
    finally:
        for a in agents:
            a.stop()
        pool.shutdown()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--variants", default="before,off,ca,tofu")
    ap.add_argument("--before-python", default="/tmp/base-lead/.venv/bin/python")
    ap.add_argument("--window", type=float, default=60.0)
    ap.add_argument("--settle", type=float, default=10.0)
    ap.add_argument("--joins", type=int, default=2)
    ap.add_argument("--spawn-gap", type=float, default=0.3)
    ap.add_argument("--base-port", type=int, default=23000)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    results: list[dict[str, Any]] = []
    variants = args.variants.split(",")
    for rnd in range(args.rounds):
        for k, v in enumerate(variants):
            r = one_round(v, rnd, args, args.base_port + 200 * k)
            print(json.dumps(r), flush=True)
            results.append(r)
            if args.out:
                args.out.write_text(json.dumps(results, indent=1))
    summary: dict[str, Any] = {}
    for v in variants:
        rs = [r for r in results if r["variant"] == v and "cpu_s_per_min" in r]

        def med(xs: list[float]) -> dict[str, float]:
            return {"median": round(statistics.median(xs), 3), "min": round(min(xs), 3),
                    "max": round(max(xs), 3), "n": len(xs)} if xs else {}
        joins = [j["all_list_it_s"] for r in rs for j in r.get("joins", [])
                 if j["all_list_it_s"] is not None]
        summary[v] = {"cpu_s_per_min": med([r["cpu_s_per_min"]["median"] for r in rs]),
                      "udp_bytes_out_per_s": med([r["udp_bytes_out_per_s"] for r in rs]),
                      "sent_udp_per_s": med([r["sent_udp_per_s"] for r in rs]),
                      "sent_tcp_per_s": med([r["sent_tcp_per_s"] for r in rs]),
                      "rss_mib": med([r["rss_mib"] for r in rs]),
                      "join_s": med(joins),
                      "join_api_up_s": med([j["api_up_s"] for r in rs
                                            for j in r.get("joins", []) if j["api_up_s"]])}
    print(json.dumps({"summary": summary}, indent=1))


if __name__ == "__main__":
    main()
