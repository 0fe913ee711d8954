#!/usr/bin/env python3
"""kill -9 detection: the simulator held against real agents, in one run.

The real side is the shared harness (``../shared/anchors/gossip/harness.py detect
--driver rumor``): ``--nodes`` agents on 127.0.0.1, one victim killed after another,
the first suspicion and the moment every live agent declared it failed taken from the
agents' logs. The simulated side is ``rumor sim detect``, which follows the same
procedure (nodes joined through a seed, victims drawn from all but the first node,
killed at a random moment of the probe cycle, 5 s apart) on the same node count and
profile. Real rounds (one harness run per ``--real-seeds`` entry) are pooled, as are
the simulated seeds, and the medians compared: the issue's bar is within 10%.

The first suspicion is the first probe of the victim after the kill plus one probe
period, so its spread is about an exponential's: 30 real trials move its median by
±0.2 s (12%). Pool ≥ 100 (``--resume`` adds seeds to rounds already run).

    python3 bench/sim_vs_real.py                          # 30 nodes, 10 x 10 real trials (~25 min)
    python3 bench/sim_vs_real.py --nodes 10 --real-seeds 1 --trials 5 --sim-seeds 5

The harness needs no root for ``detect``; rumor is the ``rumor`` on PATH unless
``--rumor-bin`` says otherwise. Raw results go under ``--results-dir``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from rumor.simulations.scenarios import SCENARIOS, Params

HERE = Path(__file__).resolve().parent
DEFAULT_HARNESS = HERE.parent.parent / "shared" / "anchors" / "gossip" / "harness.py"

#: (label, harness trial key, simulator trial key)
MEASURES = [("first suspicion", "log_first_suspect_s", "first_suspect_s"),
            ("first failed", "log_first_failed_s", "first_failed_s"),
            ("every live node lists it failed", "log_all_failed_s", "all_failed_s")]
BAR = 0.10


def real_round(args: argparse.Namespace, seed: int) -> list[dict[str, Any]]:
    out = args.results_dir / f"real-seed{seed}.json"
    if args.resume and out.exists():
        kept: list[dict[str, Any]] = json.loads(out.read_text())["result"]["trials"]
        print(f"== real, seed {seed}: {len(kept)} trials kept from {out}", file=sys.stderr)
        return kept
    argv = [sys.executable, str(args.harness), "detect", "--driver", "rumor",
            "--nodes", str(args.nodes), "--trials", str(args.trials), "--seed", str(seed),
            "--workdir", str(args.results_dir / "work"), "--base-port", str(args.base_port)]
    env = dict(os.environ, RUMOR_BIN=args.rumor_bin)
    print(f"== real, seed {seed}: {' '.join(argv[1:])}", file=sys.stderr, flush=True)
    t0 = time.monotonic()
    r = subprocess.run(argv, env=env, capture_output=True, text=True)
    (args.results_dir / f"real-seed{seed}.stderr").write_text(r.stderr)
    if r.returncode != 0:
        print(r.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"harness failed for seed {seed} (exit {r.returncode})")
    out.write_text(r.stdout)
    trials: list[dict[str, Any]] = json.loads(r.stdout)["result"]["trials"]
    print(f"   {len(trials)} trials in {time.monotonic() - t0:.0f} s", file=sys.stderr,
          flush=True)
    return trials


def sim_round(args: argparse.Namespace, seed: int) -> list[dict[str, Any]]:
    p = Params(nodes=args.nodes, seed=seed, profile=args.profile,
               warm=args.sim_start == "warm", extra={"trials": args.trials})
    report = SCENARIOS["detect"](p, None)
    (args.results_dir / f"sim-seed{seed}.json").write_text(json.dumps(report))
    trials: list[dict[str, Any]] = report["result"]["trials"]
    return trials


def medians(trials: list[dict[str, Any]], key: str) -> tuple[float | None, int]:
    xs = [t[key] for t in trials if t.get(key) is not None]
    return (round(statistics.median(xs), 3) if xs else None), len(xs)


def median_interval(trials: list[dict[str, Any]], key: str) -> tuple[float, float] | None:
    """A 95% bootstrap interval of the median (seeded, so a rerun prints the same)."""
    xs = [t[key] for t in trials if t.get(key) is not None]
    if len(xs) < 2:
        return None
    rng = random.Random(0)
    ms = sorted(statistics.median(rng.choices(xs, k=len(xs))) for _ in range(2000))
    return round(ms[50], 3), round(ms[1949], 3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, default=30)
    ap.add_argument("--trials", type=int, default=10, help="victims per round")
    ap.add_argument("--real-seeds", type=int, nargs="+", default=list(range(1, 11)))
    ap.add_argument("--sim-seeds", type=int, default=100,
                    help="simulated rounds (seeds 1..N); 100 take about 30 s")
    ap.add_argument("--sim-start", choices=["cold", "warm"], default="cold",
                    help="cold (default): the simulated nodes join through a seed, as the "
                    "harness starts its agents; warm: they start from a converged table")
    ap.add_argument("--profile", default="lan")
    ap.add_argument("--harness", type=Path, default=DEFAULT_HARNESS)
    ap.add_argument("--rumor-bin", default=shutil.which("rumor") or "rumor")
    ap.add_argument("--base-port", type=int, default=27000)
    ap.add_argument("--results-dir", type=Path, default=Path("/tmp/rumor-sim-vs-real"))
    ap.add_argument("--resume", action="store_true",
                    help="keep the real rounds already in --results-dir (add seeds to pool "
                    "more trials without re-running the old ones)")
    ap.add_argument("--json", action="store_true", help="print the comparison as JSON")
    args = ap.parse_args()
    args.results_dir.mkdir(parents=True, exist_ok=True)

    real: list[dict[str, Any]] = []
    per_round: list[dict[str, float | None]] = []
    for seed in args.real_seeds:
        got = real_round(args, seed)
        real += got
        per_round.append({h: medians(got, h)[0] for _, h, _ in MEASURES})
    t0 = time.monotonic()
    sim: list[dict[str, Any]] = []
    for seed in range(1, args.sim_seeds + 1):
        sim += sim_round(args, seed)
    print(f"== simulated: {len(sim)} trials over {args.sim_seeds} seeds in "
          f"{time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)

    rows = []
    for label, hkey, skey in MEASURES:
        r, rn = medians(real, hkey)
        s, sn = medians(sim, skey)
        rounds = [x[hkey] for x in per_round if x[hkey] is not None]
        ratio = None if r is None or s is None else round(s / r, 3)
        rows.append({"measure": label, "real_median_s": r, "real_n": rn,
                     "real_median_95ci_s": median_interval(real, hkey),
                     "real_round_medians_s": rounds, "sim_median_s": s, "sim_n": sn,
                     "sim_over_real": ratio,
                     "within_bar": ratio is not None and abs(ratio - 1.0) <= BAR})
    if args.json:
        print(json.dumps({"nodes": args.nodes, "profile": args.profile, "rows": rows},
                         indent=2))
        return
    print(f"kill -9 detection, {args.nodes} nodes, {args.profile} profile "
          f"(bar: medians within {BAR:.0%})\n")
    print("| measure | real median (n) | its 95% interval | round medians | sim median (n) "
          "| sim/real | ok |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        rounds = ", ".join(f"{x:.2f}" for x in row["real_round_medians_s"])
        ci = row["real_median_95ci_s"]
        ci_text = f"{ci[0]}–{ci[1]} s" if ci else "–"
        print(f"| {row['measure']} | {row['real_median_s']} s ({row['real_n']}) | {ci_text} "
              f"| {rounds} | {row['sim_median_s']} s ({row['sim_n']}) "
              f"| {row['sim_over_real']} | {'yes' if row['within_bar'] else 'no'} |")


if __name__ == "__main__":
    main()
