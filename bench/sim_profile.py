#!/usr/bin/env python3
"""Where the simulator spends its time, and what 10,000 full member tables would cost.

    python bench/sim_profile.py cpu --nodes 1000 --scenario crash   # cProfile top 25
    python bench/sim_profile.py memory --nodes 2000                 # bytes per record

``memory`` builds a converged cluster, measures the bytes each (observer, member)
record costs with tracemalloc, then shares the strings, address tuples and metadata
maps between all tables and measures again (the core already shares empty metadata
and, through the push-pull row memo, names and addresses; the second figure shows
what is left to gain).
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import pstats
import sys
import tracemalloc
from typing import Any

from rumor.gossip.config import LAN
from rumor.simulations.engine import Simulator
from rumor.simulations.network import PROFILE_LATENCY, Network
from rumor.simulations.scenarios import SCENARIOS, Params, warm_cluster


def cpu(nodes: int, scenario: str, duration: float, cold: bool,
        report: str | None = None) -> None:
    p = Params(nodes=nodes, duration=duration, warm=not cold)
    prof = cProfile.Profile()
    prof.enable()
    rep = SCENARIOS[scenario](p, None)
    prof.disable()
    if report:
        import json
        with open(report, "w") as f:
            json.dump({k: v for k, v in rep.items() if k != "wall"}, f, sort_keys=True)
    print(f"{scenario} {nodes} nodes: {rep['sim']['events']} events, wall {rep['wall']}",
          file=sys.stderr)
    pstats.Stats(prof, stream=sys.stdout).sort_stats("tottime").print_stats(25)


def memory(nodes: int) -> None:
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    sim = Simulator(LAN, Network(PROFILE_LATENCY["lan"]), seed=1)
    warm_cluster(sim, nodes)
    gc.collect()
    after = tracemalloc.get_traced_memory()[0]
    records = nodes * nodes
    per = (after - before) / records
    print(f"{nodes} nodes: {(after - before) / 2**20:.1f} MiB for {records} member records "
          f"= {per:.0f} B/record; at 10,000 nodes: {per * 1e8 / 2**30:.1f} GiB")
    # What interning would save: one str per name, one tuple per address, one empty
    # dict for all empty metadata.
    names: dict[str, str] = {}
    addrs: dict[Any, Any] = {}
    empty: dict[str, str] = {}
    for nd in sim.nodes:
        for m in nd.core.members.values():
            m.name = names.setdefault(m.name, m.name)
            m.addr = addrs.setdefault(m.addr, m.addr)
            if not m.meta:
                m.meta = empty
    gc.collect()
    shared = tracemalloc.get_traced_memory()[0]
    per2 = (shared - before) / records
    print(f"interned: {(shared - before) / 2**20:.1f} MiB = {per2:.0f} B/record; "
          f"at 10,000 nodes: {per2 * 1e8 / 2**30:.1f} GiB")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("what", choices=["cpu", "memory"])
    ap.add_argument("--nodes", type=int, default=1000)
    ap.add_argument("--scenario", choices=sorted(SCENARIOS), default="crash")
    ap.add_argument("--duration", type=float, default=60.0)
    ap.add_argument("--cold", action="store_true")
    ap.add_argument("--report", default=None, help="cpu: also write the JSON report here")
    a = ap.parse_args()
    if a.what == "cpu":
        cpu(a.nodes, a.scenario, a.duration, a.cold, a.report)
    else:
        memory(a.nodes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
