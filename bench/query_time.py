#!/usr/bin/env python3
"""How long a cluster-wide query takes to collect every answer (issue 29).

* **real**: ``--agents`` agents on 127.0.0.1 (``--profile lan``, agent i joining agent
  0); once all list all alive, ``--rounds`` times ``GET /v1/query/ping`` on agent 0
  (alternating the asking agent is pointless here: one origin is the measured case)
  and reads each answer's arrival after the start (``rtt_ms``); prints per round the
  time to the last answer and the median answer, and the missing count.
* **sim**: the same query on ``--sim-nodes`` simulated nodes (LAN profile, log-normal
  0.5 ms links, virtual clock), time to the last and the median answer.

    python bench/query_time.py --agents 30 --rounds 7 --sim-nodes 500,1000
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


def _get(url: str, timeout: float = 30) -> object:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.load(r)


def real(n: int, rounds: int, base: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        procs = []
        try:
            for i in range(n):
                cmd = [sys.executable, "-m", "rumor.cli.main", "agent", "--name", f"q{i}",
                       "--bind", f"127.0.0.1:{base + i}", "--api",
                       f"127.0.0.1:{base + 1000 + i}", "--profile", "lan"]
                if i:
                    cmd += ["--join", f"127.0.0.1:{base}"]
                log = open(Path(tmp) / f"q{i}.log", "w")  # noqa: SIM115 (closed with the process)
                procs.append(subprocess.Popen(cmd, stdout=log, stderr=log))
                if i == 0:
                    time.sleep(1.5)
            api = f"http://127.0.0.1:{base + 1000}"
            t0 = time.monotonic()
            while True:
                try:
                    live = [m for m in _get(f"{api}/v1/members", 5)  # type: ignore[attr-defined]
                            if m["status"] == "alive"]
                    if len(live) == n:
                        break
                except OSError:
                    pass
                if time.monotonic() - t0 > 120:
                    raise SystemExit("agents did not converge")
                time.sleep(0.2)
            time.sleep(3)
            lasts, medians = [], []
            for r in range(rounds):
                doc = _get(f"{api}/v1/query/ping?timeout=5s")
                assert isinstance(doc, dict)
                times = [a["rtt_ms"] for m, a in doc["answers"].items() if a["via"] != "local"]
                lasts.append(max(times))
                medians.append(statistics.median(times))
                print(f"real round {r}: {len(doc['answers'])} answered, "
                      f"{len(doc['missing'])} missing, median {medians[-1]:.1f} ms, "
                      f"last {lasts[-1]:.1f} ms", flush=True)
                time.sleep(1.0)
            print(f"real {n} agents: time to all answers median {statistics.median(lasts):.1f} ms "
                  f"(range {min(lasts):.1f}-{max(lasts):.1f}), median answer "
                  f"{statistics.median(medians):.1f} ms")
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                p.wait(timeout=20)


def sim(n: int) -> None:
    from rumor.gossip.config import LAN
    from rumor.simulations.engine import Simulator
    from rumor.simulations.network import LogNormal, Network
    from rumor.simulations.scenarios import warm_cluster
    s = Simulator(LAN, Network(LogNormal(0.0005, 0.3, floor=0.0001)), seed=3)
    warm_cluster(s, n)
    s.run_until(s.now + 2.0)
    q = s.nodes[0].parts.queries
    ids: list[str] = []
    t0 = s.now
    s.drive(0, lambda core: ids.append(q.start(s.now, "ping", timeout=3.0)))
    s.run_while(lambda: not q.done(s.now, ids[0]), limit=5, step=0.01)
    p = q.finish(ids[0])
    assert p is not None
    arr = [a.arrived - t0 for a in p.answers.values() if a.via != "local"]
    print(f"sim {n} nodes: {len(p.answers)} answered, {len(p.missing)} missing, "
          f"median {statistics.median(arr) * 1000:.0f} ms, last {max(arr) * 1000:.0f} ms")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--agents", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--base-port", type=int, default=21000)
    ap.add_argument("--sim-nodes", default="500,1000")
    args = ap.parse_args()
    if args.agents:
        real(args.agents, args.rounds, args.base_port)
    for n in filter(None, args.sim_nodes.split(",")):
        sim(int(n))


if __name__ == "__main__":
    main()
