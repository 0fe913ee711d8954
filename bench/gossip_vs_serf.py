#!/usr/bin/env python3
"""Membership benchmark: rumor and Serf side by side through the shared harness.

Runs ``../shared/anchors/gossip/harness.py`` for each scenario, first with Serf and
then with rumor (same machine, same node count, back to back), keeps every raw JSON
result under ``--results-dir``, and prints a Markdown table with the ratios.

    sudo python3 bench/gossip_vs_serf.py --nodes 30            # all scenarios
    python3 bench/gossip_vs_serf.py --scenarios converge detect  # no root needed

``falsepos`` and ``footprint`` need root (nftables loss and byte counters). Needs
Debian's ``serf`` and ``nftables``; rumor is taken from the ``rumor`` on PATH unless
``--rumor-bin`` says otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DEFAULT_HARNESS = HERE.parent.parent / "shared" / "anchors" / "gossip" / "harness.py"
SCENARIOS = ["converge", "detect", "falsepos", "footprint"]


def run_harness(harness: Path, scenario: str, driver: str, args: argparse.Namespace,
                out: Path, extra_env: dict[str, str]) -> dict[str, Any]:
    """One harness run; its JSON lands in ``out`` and its stderr beside it."""
    argv = [sys.executable, str(harness), scenario, "--driver", driver,
            "--nodes", str(args.nodes), "--workdir", str(args.results_dir / "work" / driver),
            "--base-port", str(args.base_port), "--out", str(out)]
    if scenario == "falsepos":
        argv += ["--loss", str(args.loss), "--duration", str(args.duration)]
    if scenario == "detect":
        argv += ["--trials", str(args.trials)]
    if scenario == "converge":
        argv += ["--repeat", str(args.repeat)]
    if scenario == "footprint":
        argv += ["--window", str(args.window)]
    env = dict(os.environ, **extra_env)
    print(f"== {scenario} / {driver}: {' '.join(argv[1:])}", file=sys.stderr, flush=True)
    t0 = time.monotonic()
    r = subprocess.run(argv, env=env, capture_output=True, text=True)
    out.with_suffix(".stderr").write_text(r.stderr)
    if r.returncode != 0:
        print(r.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"harness failed for {scenario}/{driver} (exit {r.returncode})")
    res: dict[str, Any] = json.loads(r.stdout)
    print(f"   done in {time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)
    return res


def _get(d: Any, *path: str) -> Any:
    for p in path:
        if not isinstance(d, dict):
            return None
        d = d.get(p)
    return d


#: (label, path under the scenario's result)
FIGURES = [
    ("converge after all APIs up, median s", ("converge", "converge_from_all_api_up_s",
                                              "median")),
    # From the agents' logs: serf's member list never shows "suspect".
    ("kill -9 → first suspicion logged, median s", ("detect", "summary",
                                                     "log_first_suspect_s", "median")),
    ("kill -9 → every agent lists failed, median s", ("detect", "summary",
                                                       "poll_all_failed_s", "median")),
    ("false failures (log events) under UDP loss", ("falsepos", "log_failed_events")),
    ("false failures (poll transitions)", ("falsepos", "poll_failed_transitions")),
    ("RSS per agent, MiB", ("footprint", "rss_mib_per_agent", "mean")),
    ("CPU per agent idle, s/min", ("footprint", "cpu_s_per_agent_per_min", "mean")),
    ("gossip bytes per agent per s", ("footprint", "gossip_bytes_per_agent_per_s")),
]


def figure(rounds: list[dict[str, Any]], path: tuple[str, ...]) -> list[float]:
    """One figure from every round that measured it (the harness nests figures under
    "result")."""
    full = (path[0], "result", *path[1:])
    got = [_get(r, *full) for r in rounds]
    return [float(x) for x in got if isinstance(x, (int, float))]


def cell(xs: list[float]) -> str:
    """The median over rounds, with the range when there was more than one."""
    if not xs:
        return "–"
    m = statistics.median(xs)
    if len(xs) == 1:
        return f"{m:g}"
    return f"{m:g} ({min(xs):g}–{max(xs):g})"


def table(results: dict[str, list[dict[str, Any]]], keys: list[str]) -> list[str]:
    """Markdown rows: each system's median over rounds, then each one's ratio to the
    first system (serf)."""
    head = ["figure", *keys, *(f"{k}/{keys[0]}" for k in keys[1:])]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, path in FIGURES:
        vals = {k: figure(results.get(k, []), path) for k in keys}
        if not any(vals.values()):
            continue
        ref = statistics.median(vals[keys[0]]) if vals[keys[0]] else 0.0
        ratios = [f"{statistics.median(vals[k]) / ref:.2f}×" if ref and vals[k] else ""
                  for k in keys[1:]]
        lines.append("| " + " | ".join([label, *(cell(vals[k]) for k in keys), *ratios])
                     + " |")
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, default=30)
    p.add_argument("--scenarios", nargs="+", choices=SCENARIOS, default=SCENARIOS)
    p.add_argument("--drivers", nargs="+", default=["serf-rpc", "rumor"])
    p.add_argument("--harness", type=Path, default=DEFAULT_HARNESS)
    p.add_argument("--results-dir", type=Path, default=HERE / "results" / "gossip")
    p.add_argument("--rumor-bin", default=shutil.which("rumor") or "rumor")
    p.add_argument("--baseline-bin", default=None,
                   help="an older rumor build, run as a third system ('baseline') in "
                        "every round: a before/after figure from the same run")
    p.add_argument("--rounds", type=int, default=1,
                   help="repeat every scenario and system this often, alternating "
                        "systems; the table gives medians and ranges")
    p.add_argument("--profile", default=None, help="rumor --profile (default: lan)")
    p.add_argument("--base-port", type=int, default=23100)
    p.add_argument("--loss", type=int, default=10)
    p.add_argument("--duration", type=float, default=120)
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--window", type=float, default=30)
    args = p.parse_args()
    if not args.harness.exists():
        raise SystemExit(f"harness not found at {args.harness} (use --harness)")
    args.results_dir.mkdir(parents=True, exist_ok=True)
    # (result key, harness driver, RUMOR_BIN)
    systems = [("serf" if d.startswith("serf") else d, d, args.rumor_bin)
               for d in args.drivers]
    if args.baseline_bin:
        systems.append(("baseline", "rumor", args.baseline_bin))
    results: dict[str, list[dict[str, Any]]] = {key: [] for key, _, _ in systems}
    for rnd in range(args.rounds):
        for key, _, _ in systems:
            results[key].append({})
        # Odd rounds run the systems in reverse, so a slow spell of the VM does not
        # always land on the same one.
        order = systems if rnd % 2 == 0 else systems[::-1]
        for scenario in args.scenarios:
            for key, driver, binary in order:
                env = {"RUMOR_BIN": binary}
                if args.profile:
                    env["RUMOR_PROFILE"] = args.profile
                out = args.results_dir / f"{scenario}-{key}-round{rnd + 1}.json"
                results[key][rnd][scenario] = run_harness(
                    args.harness, scenario, driver, args, out, env)
                time.sleep(2)
    (args.results_dir / "summary.json").write_text(json.dumps(results, indent=2))
    keys = [key for key, _, _ in systems]
    print(f"\n{args.nodes} agents on loopback, LAN profile, {args.rounds} round(s), "
          f"{time.strftime('%Y-%m-%d')}:\n")
    print("\n".join(table(results, keys)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
