#!/usr/bin/env python3
"""The simulator held against real agents on a kernel network: the issue's figures.

Each *study* runs ``rumor lab SCENARIO --json`` rounds (real agents in namespaces)
and the simulator's scenario on the same parameters (``rumor lab compare``'s
``sim_reports``: cold start, the lab's delay as the network's latency), pools each
side, and prints one table: lab median with its 95% bootstrap interval, simulator
median, their ratio and the bar.

    sudo python3 bench/lab_vs_sim.py --results-dir /tmp/lab-vs-sim            # all (~80 min)
    sudo python3 bench/lab_vs_sim.py --studies detect-lan --rounds 2 --trials 5  # a taste
    sudo python3 bench/lab_vs_sim.py --results-dir DIR --resume --report-only

Studies: ``detect-lan``/``detect-wan`` (kill -9 one agent after another: first
suspicion, all failed; pooled ≥ 100 trials), ``loss-lan``/``loss-wan`` (10% loss of
all packets, UDP and TCP, for 120 s: false failures), ``partition-lan``/
``partition-wan`` (a symmetric half split, healed: merge time), ``bytes-lan``/
``bytes-wan`` (a quiet cluster's payload bytes per node). WAN-like: the LAN gossip
profile over 20 ms ± 5 ms one-way through the delay line (``uniform:0.015:0.025``).
Each lab round is kept as JSON in ``--results-dir``; ``--resume`` keeps those.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

WAN_DELAY = "uniform:0.015:0.025"


def _trials(key: str) -> Callable[[dict[str, Any]], list[float]]:
    return lambda r: [t[key] for t in r["result"]["trials"] if t.get(key) is not None]


def _one(*path: str | int) -> Callable[[dict[str, Any]], list[float]]:
    def get(r: dict[str, Any]) -> list[float]:
        v: Any = r["result"]
        for k in path:
            v = v[k] if v is not None else None
        return [] if v is None else [float(v)]
    return get


#: study -> (scenario, lab arguments, measures: (label, getter, bar or None for equal))
def studies(args: argparse.Namespace) -> dict[str, tuple[str, list[str], list[Any]]]:
    n = str(args.nodes)
    det = [("first suspicion", _trials("first_suspect_s"), 0.10),
           ("first failure", _trials("first_failed_s"), 0.10),
           ("every live node lists it failed", _trials("all_failed_s"), 0.10)]
    loss = [("false failures of healthy nodes (sum)",
             _one("sweep", -1, "false_positives", "failed_healthy"), None),
            ("false suspicions of healthy nodes (per run)",
             _one("sweep", -1, "false_positives", "suspect_healthy"), 0.5),
            ("refutations (per run)", _one("sweep", -1, "refutations"), 0.5)]
    part = [("merged after the heal", _one("merge_after_heal_s"), 0.20)]
    quiet = [("UDP payload bytes per node per s",
              _one("sweep", -1, "traffic", "bytes_per_node_per_s"), 0.10),
             ("UDP packets per node per s",
              _one("sweep", -1, "traffic", "packets_per_node_per_s"), 0.10),
             ("TCP payload bytes per node per s",
              _one("sweep", -1, "traffic", "stream_bytes_per_node_per_s"), 0.10)]
    out: dict[str, tuple[str, list[str], list[Any]]] = {}
    for net, extra in (("lan", []), ("wan", ["--delay", WAN_DELAY])):
        out[f"detect-{net}"] = ("detect", ["--nodes", n, "--trials", str(args.trials),
                                           *extra], det)
        out[f"loss-{net}"] = ("loss", ["--nodes", n, "--loss", "0.1", "--duration", "120",
                                       *extra], loss)
        out[f"partition-{net}"] = ("partition", ["--nodes", n, *extra], part)
        out[f"bytes-{net}"] = ("loss", ["--nodes", n, "--loss", "0", "--duration", "60",
                                        *extra], quiet)
    return out


def lab_round(args: argparse.Namespace, study: str, scenario: str, argv: list[str],
              seed: int) -> dict[str, Any]:
    out = args.results_dir / f"{study}-lab-seed{seed}.json"
    if args.resume and out.exists():
        return dict(json.loads(out.read_text()))
    if args.report_only:
        raise SystemExit(f"{out} missing (--report-only)")
    cmd = [sys.executable, "-m", "rumor.cli", "lab", scenario, *argv, "--seed", str(seed),
           "--json", "--quiet"]
    t0 = time.monotonic()
    print(f"== {study} seed {seed}: rumor {' '.join(cmd[3:])} (load "
          f"{os.getloadavg()[0]:.2f})", file=sys.stderr, flush=True)
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        print(r.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"lab round failed ({study}, seed {seed})")
    out.write_text(r.stdout)
    print(f"   {time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)
    return dict(json.loads(r.stdout))


def sim_rounds(args: argparse.Namespace, study: str, scenario: str, argv: list[str],
               seeds: int) -> list[dict[str, Any]]:
    out = args.results_dir / f"{study}-sim.json"
    if args.resume and out.exists():
        kept: list[dict[str, Any]] = json.loads(out.read_text())
        if len(kept) >= seeds:
            return kept
    from rumor.cli.main import build_parser
    from rumor.simulations.lab.cli import lab_params, sim_reports
    ns = build_parser().parse_args(["lab", scenario, *argv])
    p = lab_params(ns, scenario)
    p.seed = 1000
    reports = sim_reports(scenario, p, seeds)
    for r in reports:  # curves and examples are bulky and unused here
        r["result"].pop("curves", None)
    out.write_text(json.dumps(reports))
    return reports


def interval(xs: list[float]) -> tuple[float, float] | None:
    if len(xs) < 2:
        return None
    rng = random.Random(0)
    ms = sorted(statistics.median(rng.choices(xs, k=len(xs))) for _ in range(2000))
    return ms[50], ms[1949]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--studies", nargs="+", default=None)
    ap.add_argument("--nodes", type=int, default=20)
    ap.add_argument("--trials", type=int, default=18, help="detect: victims per round")
    ap.add_argument("--rounds", type=int, default=6, help="detect: lab rounds (seeds)")
    ap.add_argument("--other-rounds", type=int, default=3,
                    help="loss, partition, bytes: lab rounds")
    ap.add_argument("--sim-seeds", type=int, default=20)
    ap.add_argument("--results-dir", type=Path, default=Path("/tmp/rumor-lab-vs-sim"))
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    args.results_dir.mkdir(parents=True, exist_ok=True)
    table = studies(args)
    chosen = args.studies or list(table)
    rows = []
    for study in chosen:
        scenario, argv, measures = table[study]
        rounds = args.rounds if scenario == "detect" else args.other_rounds
        labs = [lab_round(args, study, scenario, argv, seed) for seed in range(1, rounds + 1)]
        sims = sim_rounds(args, study, scenario, argv, args.sim_seeds)
        for label, get, bar in measures:
            lx = [x for r in labs for x in get(r)]
            sx = [x for r in sims for x in get(r)]
            if bar is None:  # a count: the totals per run, compared as means
                lv = sum(lx) / len(lx) if lx else None
                sv = sum(sx) / len(sx) if sx else None
                ok = lv is not None and lv == sv
                ci = None
            else:
                lv = statistics.median(lx) if lx else None
                sv = statistics.median(sx) if sx else None
                ci = interval(lx)
                ok = (lv is not None and sv is not None and lv > 0
                      and abs(sv / lv - 1) <= bar) or (
                    ci is not None and sv is not None and ci[0] <= sv <= ci[1])
            rows.append({"study": study, "measure": label, "lab": lv, "lab_n": len(lx),
                         "lab_95ci": ci, "sim": sv, "sim_n": len(sx),
                         "sim_over_lab": round(sv / lv, 3) if lv and sv is not None
                         else None,
                         "bar": "equal (mean per run)" if bar is None else f"±{bar:.0%}",
                         "ok": ok})
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"lab ({args.nodes} agents in namespaces) vs simulator ({args.nodes} nodes), "
          "cold start, LAN gossip profile; WAN-like = 20 ± 5 ms one way\n")
    print("| study | measure | lab median (n) | lab 95% interval | sim median (n) | sim/lab "
          "| bar | ok |")
    print("|---|---|---|---|---|---|---|---|")

    def f(v: float | None) -> str:
        return "–" if v is None else f"{v:.3f}" if abs(v) < 100 else f"{v:,.0f}"
    for r in rows:
        ci = r["lab_95ci"]
        print(f"| {r['study']} | {r['measure']} | {f(r['lab'])} ({r['lab_n']}) | "
              f"{'–' if ci is None else f'{f(ci[0])}–{f(ci[1])}'} | {f(r['sim'])} "
              f"({r['sim_n']}) | {r['sim_over_lab'] if r['sim_over_lab'] is not None else '–'}"
              f" | {r['bar']} | {'yes' if r['ok'] else 'NO'} |")


if __name__ == "__main__":
    main()
