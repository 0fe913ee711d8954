#!/usr/bin/env python3
"""``rumor sim traffic`` held against the real sidecar pair, variant by variant.

The real side is the shared harness (``../shared/anchors/proxy/bench.py slow-backend``):
three ``backend.py`` instances, one degraded, an open-loop ``loadgen.py`` at ``--rate``,
through the rumor pair (``bench/proxy_pair.py``: caller sidecar, one callee per backend)
and through haproxy ``balance roundrobin``, measured in turn, round after round. The
simulated side is ``rumor sim traffic`` on the same variant, rate, warm-up and
duration: the pair is peak EWMA, haproxy-rr is round robin. Real rounds are pooled as
medians with their range, as are the simulated seeds, and the ratio sim / real is
printed for p99 and for the share of answers from the degraded instance. The bar is
within 20% on both (for a share, also met when both are under 0.1% of the requests:
a ratio of two counts of a few requests in 20,000 says nothing).

    .venv/bin/python bench/traffic_sim_vs_real.py                      # ~10 min
    .venv/bin/python bench/traffic_sim_vs_real.py --real-jsonl R.jsonl  # reuse a harness run

The harness marks a round disturbed when another process takes more than 40% of a core
beside it, and repeats it (4 times at most). If fewer than ``--rounds`` rounds stayed
undisturbed, every round is used and the table says so.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from rumor.simulations.traffic import TrafficParams, run_traffic

HERE = Path(__file__).resolve().parent
DEFAULT_HARNESS = HERE.parent.parent / "shared" / "anchors" / "proxy" / "bench.py"
VARIANTS = {"fixed50": "0,0,50", "tail10x200": "0,0,0:0.1:200"}
#: real target -> simulated balancer
PAIRS = {"rumor": "peak_ewma", "haproxy-rr": "round_robin"}
BAR = 0.20
SHARE_FLOOR = 0.001


def run_harness(args: argparse.Namespace) -> Path:
    args.results_dir.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, str(args.harness), "slow-backend",
            "--targets", ",".join(PAIRS), "--rounds", str(args.rounds),
            "--rate", str(args.rate), "--duration", str(args.duration),
            "--warmup", str(args.warmup), "--host-header", "bench",
            "--base-port", str(args.base_port), "--results-dir", str(args.results_dir),
            "--proxy-cmd", f"rumor={sys.executable} {HERE / 'proxy_pair.py'}"]
    for v in args.variants:
        argv += ["--variant", f"{v}={VARIANTS[v]}"]
    print("== real: " + " ".join(argv[1:]), file=sys.stderr, flush=True)
    before = set(args.results_dir.glob("slow-backend-*.jsonl"))
    subprocess.run(argv, check=True)
    new = sorted(set(args.results_dir.glob("slow-backend-*.jsonl")) - before)
    if not new:
        raise SystemExit("the harness wrote no records")
    return new[-1]


def stats(xs: list[float]) -> dict[str, float | int]:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def real_figures(jsonl: Path, rounds: int) -> dict[tuple[str, str], dict[str, Any]]:
    recs = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for variant in {r["variant"] for r in recs}:
        mine = [r for r in recs if r["variant"] == variant]
        clean = [r for r in mine if not r.get("round_disturbed")]
        clean_rounds = len({r["round"] for r in clean})
        use = clean if clean_rounds >= rounds else mine
        for target in {r["target"] for r in use}:
            rs = [r for r in use if r["target"] == target]
            out[(variant, target)] = {
                "p99_ms": stats([r["result"]["latency_ms"]["p99"] for r in rs]),
                "p50_ms": stats([r["result"]["latency_ms"]["p50"] for r in rs]),
                "sched_p99_ms": stats([r["result"]["latency_sched_ms"]["p99"] for r in rs]),
                "share_degraded": stats([r["share_degraded"] for r in rs]),
                "send_lag_p99_ms": stats([r["result"]["send_lag_ms"]["p99"] for r in rs]),
                "unaccounted_cpu_pct": stats([r["cpu_pct"]["unaccounted"] or 0.0
                                              for r in rs]),
                "proxy_cpu_pct": stats([r["cpu_pct"]["proxy"] or 0.0 for r in rs]),
                "rounds_used": len(rs), "clean_rounds": clean_rounds,
                "disturbed_rounds_used": use is mine and clean_rounds < rounds,
            }
    return out


def sim_figures(args: argparse.Namespace, variant: str) -> dict[str, dict[str, Any]]:
    rows: dict[str, list[dict[str, Any]]] = {b: [] for b in PAIRS.values()}
    wall = 0.0
    requests = 0
    for seed in range(1, args.sim_seeds + 1):
        rep = run_traffic(TrafficParams(
            seed=seed, rate=args.rate, duration=args.duration, warmup=args.warmup,
            variant=variant, balancers=tuple(PAIRS.values()), hop_ms=args.hop_ms,
            hop_dist=args.hop_dist))
        wall += rep["wall"]["seconds"]
        requests += rep["sim"]["requests"]
        for b, r in rep["result"]["balancers"].items():
            rows[b].append(r)
    print(f"== sim {variant}: {args.sim_seeds} seeds, {requests} requests in {wall:.1f} s "
          f"({requests / wall:,.0f} requests/s)", file=sys.stderr)
    return {b: {"p99_ms": stats([r["latency_ms"]["p99"] for r in rs]),
                "p50_ms": stats([r["latency_ms"]["p50"] for r in rs]),
                "share_degraded": stats([r["share_degraded"] for r in rs])}
            for b, rs in rows.items()}


def _range(s: dict[str, Any], scale: float = 1.0, fmt: str = "{:.2f}") -> str:
    return (f"{fmt.format(s['median'] * scale)} "
            f"[{fmt.format(s['min'] * scale)}–{fmt.format(s['max'] * scale)}]")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--harness", type=Path, default=DEFAULT_HARNESS)
    p.add_argument("--variants", type=lambda s: s.split(","), default=list(VARIANTS))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--rate", type=float, default=1000.0)
    p.add_argument("--duration", type=float, default=20.0)
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--base-port", type=int, default=23000)
    p.add_argument("--results-dir", type=Path, default=Path("/tmp/traffic-sim-vs-real"))
    p.add_argument("--real-jsonl", type=Path, default=None,
                   help="use this harness record file instead of running the harness")
    p.add_argument("--sim-seeds", type=int, default=3)
    p.add_argument("--hop-ms", type=float, default=0.15)
    p.add_argument("--hop-dist", choices=("fixed", "exp"), default="fixed")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    for v in args.variants:
        if v not in VARIANTS:
            p.error(f"unknown variant {v!r}: one of {', '.join(VARIANTS)}")
    jsonl = args.real_jsonl or run_harness(args)
    real = real_figures(jsonl, args.rounds)
    out: list[dict[str, Any]] = []
    for v in args.variants:
        sim = sim_figures(args, v)
        for target, balancer in PAIRS.items():
            r = real.get((v, target))
            if r is None:
                continue
            s = sim[balancer]
            p99_ratio = s["p99_ms"]["median"] / r["p99_ms"]["median"]
            rs, ss = r["share_degraded"]["median"], s["share_degraded"]["median"]
            share_ratio = ss / rs if rs > 0 else None
            share_ok = (max(rs, ss) < SHARE_FLOOR
                        or (share_ratio is not None and abs(share_ratio - 1) <= BAR))
            out.append({"variant": v, "target": target, "sim_balancer": balancer,
                        "real": r, "sim": s, "p99_ratio": p99_ratio,
                        "share_ratio": share_ratio,
                        "p99_within_bar": abs(p99_ratio - 1) <= BAR,
                        "share_within_bar": share_ok})
    if args.json:
        print(json.dumps({"records": str(jsonl), "rows": out}, default=str))
        return 0
    print(f"real records: {jsonl}")
    head = ["variant", "target", "real p99 ms", "sim p99 ms", "ratio", "real to degraded",
            "sim to degraded", "ratio", "rounds (clean)", "unaccounted CPU %"]
    rows = []
    for o in out:
        r, s = o["real"], o["sim"]
        rows.append([
            o["variant"], f"{o['target']} / {o['sim_balancer']}", _range(r["p99_ms"]),
            _range(s["p99_ms"]), f"{o['p99_ratio']:.2f}" + ("" if o["p99_within_bar"] else " ✗"),
            _range(r["share_degraded"], 100, "{:.2f}%"),
            _range(s["share_degraded"], 100, "{:.2f}%"),
            ("–" if o["share_ratio"] is None else f"{o['share_ratio']:.2f}")
            + ("" if o["share_within_bar"] else " ✗"),
            f"{r['rounds_used']} ({r['clean_rounds']})",
            _range(r["unaccounted_cpu_pct"], 1, "{:.0f}")])
    widths = [max(len(x[i]) for x in [head, *rows]) for i in range(len(head))]
    for row in [head, ["-" * w for w in widths], *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    print(f"\nbar: within {BAR:.0%} (shares: or both under {SHARE_FLOOR:.1%}); ✗ marks a miss")
    return 0


if __name__ == "__main__":
    sys.exit(main())
