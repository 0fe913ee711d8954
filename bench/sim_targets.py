#!/usr/bin/env python3
"""Simulator benchmarks against the figures of issue 3.

    python bench/sim_targets.py crash1k        # 1,000 nodes, crash, 60 simulated s
    python bench/sim_targets.py crash10k       # 10,000 nodes, crash, 60 simulated s
    python bench/sim_targets.py converge10k --wall-budget 600   # how far a cold
                                                                # converge gets
    python bench/sim_targets.py lan1k          # LAN 1,000: bound, 10% loss, Lifeguard
    python bench/sim_targets.py big --nodes 10000   # converge + crash at 10k
    python bench/sim_targets.py all

Each check prints one JSON line (``{"check": ..., "ok": ..., ...}``) and a verdict;
the exit status is non-zero if a target was missed. Wall-clock figures are for this
machine only; every other figure replays exactly from the seed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import sys
import time
from typing import Any

from rumor.simulations.engine import gc_paused
from rumor.simulations.scenarios import Params, cold_cluster, converge, crash, loss, make_sim, slow


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _emit(check: str, ok: bool, **figures: Any) -> bool:
    print(json.dumps({"check": check, "ok": ok, **figures}), flush=True)
    return ok


def crash1k(seed: int) -> bool:
    """1,000 nodes, ``crash`` over 60 simulated seconds: at most 60 s of wall time."""
    t0 = time.perf_counter()
    rep = crash(Params(nodes=1000, seed=seed, duration=60.0, crashes=1))
    wall = time.perf_counter() - t0
    det = rep["result"]["detection"]
    return _emit("crash1k", wall <= 60.0, wall_s=round(wall, 1), target_s=60,
                 setup_s=rep["wall"]["setup_seconds"], run_s=rep["wall"]["run_seconds"],
                 events=rep["sim"]["events"], events_per_s=rep["wall"]["events_per_s"],
                 all_know_s=det["all_know_100pct_s"]["max"],
                 bound_s=rep["analytic"]["detection_bound_s"], rss_mib=round(_rss_mib()))


def crash_big(seed: int, nodes: int, duration: float = 60.0, crashes: int = 3) -> bool:
    """Warm start of ``nodes`` nodes, then ``crashes`` die at once and the cluster runs
    ``duration`` simulated seconds: at most 15 minutes of wall time. Run it under a
    memory cap (``prlimit --as=...``): 10,000 nodes hold 10^8 member records."""
    t0 = time.perf_counter()
    rep = crash(Params(nodes=nodes, seed=seed, duration=duration, crashes=crashes))
    wall = time.perf_counter() - t0
    det = rep["result"]["detection"]
    return _emit(f"crash{nodes}", wall <= 900 and bool(rep["result"]["all_within_bound"]),
                 wall_s=round(wall, 1), target_s=900, setup_s=rep["wall"]["setup_seconds"],
                 run_s=rep["wall"]["run_seconds"], simulated_s=duration,
                 events=rep["sim"]["events"],
                 run_events_per_s=round(rep["wall"]["run_events_per_s"]),
                 crashed=det["crashed"], undetected=det["undetected"],
                 all_know_max_s=det["all_know_100pct_s"]["max"],
                 bound_s=rep["analytic"]["detection_bound_s"],
                 false_failed=rep["result"]["false_positives"]["failed_healthy"],
                 rss_mib=round(_rss_mib()))


def converge_probe(seed: int, nodes: int, wall_budget: float, rss_cap_mib: float) -> bool:
    """The ``converge`` scenario's cold start (everyone joins through the seeds at a
    random time in the first n/200 s), run in half-second slices until it converges
    or ``wall_budget`` seconds of wall time (or ``rss_cap_mib``) run out; one JSON
    line per slice batch: how far it got and what it cost."""
    p = Params(nodes=nodes, seed=seed, warm=False)
    t0 = time.perf_counter()
    sim, rec = make_sim(p)
    rng = random.Random(f"scenario:{p.seed}")
    spread = max(1.0, nodes / 200)
    cold_cluster(sim, rec, p, spread, rng)
    last = t0
    last_sim, last_events = sim.now, 0
    done = False
    with gc_paused():
        while True:
            sim.run_until(sim.now + 0.5)
            now = time.perf_counter()
            done = rec.joins_complete >= nodes
            over = now - t0 >= wall_budget or _rss_mib() >= rss_cap_mib
            if now - last < 30 and not (done or over):
                continue
            known = [len(nd.core.members) for nd in sim.nodes]
            joined = sum(1 for nd in sim.nodes if nd.join_result is not None)
            pkts = sum(nd.packets_in for nd in sim.nodes)
            byts = sum(nd.bytes_in for nd in sim.nodes)
            _emit(f"converge{nodes}-progress", done, wall_s=round(now - t0, 1),
                  simulated_s=round(sim.now, 2),
                  sim_s_per_wall_s=round((sim.now - last_sim) / (now - last), 4),
                  events=sim.events, events_per_s=round((sim.events - last_events)
                                                        / (now - last)),
                  joins_done=joined, news_complete=rec.joins_complete,
                  known_min=min(known), known_mean=round(sum(known) / nodes),
                  known_max=max(known), datagrams_in=pkts, datagram_bytes_in=byts,
                  rss_mib=round(_rss_mib()))
            last, last_sim, last_events = now, sim.now, sim.events
            if done or over:
                return done


def lan1k(seed: int) -> bool:
    """LAN profile at 1,000 nodes: crash known within the bound, zero false positives at
    10% loss, Lifeguard cuts false failures of healthy nodes in ``slow`` by >= 50x."""
    ok = True
    rep = crash(Params(nodes=1000, seed=seed, duration=90.0, crashes=5))
    det = rep["result"]["detection"]
    ok &= _emit("lan1k-crash-bound", bool(rep["result"]["all_within_bound"]),
                crashed=det["crashed"], all_know_max_s=det["all_know_100pct_s"]["max"],
                first_suspicion_mean_s=det["first_suspicion_s"]["mean"],
                bound_s=rep["analytic"]["detection_bound_s"], wall_s=rep["wall"]["seconds"])
    rep = loss(Params(nodes=1000, seed=seed, sweep=(0.10,), duration=120.0))
    (row,) = rep["result"]["sweep"]
    fp = row["false_positives"]
    ok &= _emit("lan1k-loss10", fp["failed_healthy"] == 0, false_failed=fp["failed_healthy"],
                false_suspect=fp["suspect_healthy"], duration_s=120.0,
                wall_s=rep["wall"]["seconds"])
    # 2% of the nodes stall (mean 8 s every 8 s): the profile's suspicion timeout is
    # 12 s for plain SWIM and up to 72 s, unconfirmed, with Lifeguard. About 11 min.
    rep = slow(Params(nodes=1000, seed=seed, duration=60.0, slow_fraction=0.02))
    res = rep["result"]
    on, off = res["lifeguard"]["false_positives"], res["swim"]["false_positives"]
    ratio = off["failed_healthy"] / max(on["failed_healthy"], 1)
    ok &= _emit("lan1k-slow-lifeguard", ratio >= 50, swim_false_failed=off["failed_healthy"],
                lifeguard_false_failed=on["failed_healthy"], ratio_lower_bound=ratio,
                swim_false_suspect=off["suspect_healthy"],
                lifeguard_false_suspect=on["suspect_healthy"], slow_nodes=res["slow_nodes"],
                wall_s=rep["wall"]["seconds"])
    return ok


def big(seed: int, nodes: int) -> bool:
    """``converge`` (cold joins through the seeds) then ``crash`` at ``nodes``: the two
    together within 15 minutes."""
    t0 = time.perf_counter()
    rep = converge(Params(nodes=nodes, seed=seed))
    res = rep["result"]
    t_conv = time.perf_counter() - t0
    _emit(f"converge{nodes}", bool(res["converged"]), wall_s=round(t_conv, 1),
          converged_after_s=res["converged_after_s"],
          to_100pct_max_s=res["dissemination"]["to_100pct_s"]["max"],
          events=rep["sim"]["events"], events_per_s=rep["wall"]["events_per_s"],
          rss_mib=round(_rss_mib()))
    t1 = time.perf_counter()
    rep = crash(Params(nodes=nodes, seed=seed, duration=60.0, crashes=3))
    t_crash = time.perf_counter() - t1
    det = rep["result"]["detection"]
    _emit(f"crash{nodes}", bool(rep["result"]["all_within_bound"]), wall_s=round(t_crash, 1),
          setup_s=rep["wall"]["setup_seconds"], all_know_max_s=det["all_know_100pct_s"]["max"],
          events=rep["sim"]["events"], events_per_s=rep["wall"]["events_per_s"],
          rss_mib=round(_rss_mib()))
    total = t_conv + t_crash
    return _emit(f"converge+crash{nodes}", total <= 900, wall_s=round(total, 1), target_s=900)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("check", choices=["crash1k", "crash10k", "converge10k", "lan1k", "big",
                                      "all"])
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--nodes", type=int, default=10_000, help="for 'big' and the 10k checks")
    ap.add_argument("--wall-budget", type=float, default=900.0,
                    help="converge10k: stop after this many seconds of wall time")
    ap.add_argument("--rss-cap-mib", type=float, default=14_000.0,
                    help="converge10k: stop once the process holds this much memory")
    a = ap.parse_args()
    ok = True
    if a.check in ("crash1k", "all"):
        ok &= crash1k(a.seed)
    if a.check == "crash10k":
        ok &= crash_big(a.seed, a.nodes)
    if a.check == "converge10k":
        ok &= converge_probe(a.seed, a.nodes, a.wall_budget, a.rss_cap_mib)
    if a.check in ("lan1k", "all"):
        ok &= lan1k(a.seed)
    if a.check in ("big", "all"):
        ok &= big(a.seed, a.nodes)
    print("all targets met" if ok else "some targets missed", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # skip tearing down 10^8 member records one by one
