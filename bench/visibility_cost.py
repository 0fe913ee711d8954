#!/usr/bin/env python3
"""What golden metrics and tap support cost on the request path (issue 29), in the shared
proxy harness, against the build before, in the same run.

One ``overhead`` run of ``shared/anchors/proxy/bench.py`` (wrk -c1 and -c16, one
backend, ``--abba``) with the targets ``direct``, ``haproxy``, ``rumor-old`` (the build
before, its own python and root), ``rumor-new`` (this build, no tap open) and
``rumor-tap`` (this build with a ``rumor tap`` of the service running the whole time:
``RUMOR_PAIR_TAP=1`` of ``bench/proxy_pair.py``). Then, paired within each round, the
new/old and tap/old ratios of req/s and of the pair's CPU per request. Bars: at most 5%
without a tap, 10% with one.

    python3 bench/visibility_cost.py \\
        --old-python /work/wt-prev/.venv/bin/python --old-root /work/wt-prev \\
        --new-python .venv/bin/python --new-root . --rounds 5 --results-dir /tmp/vis

    python3 bench/visibility_cost.py --tables-from RESULTS/overhead-X.jsonl

Stdlib only (the harness needs ``haproxy nginx wrk``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pipeline_ab import (
    check_build,
    cpu_per_req_overhead,
    find_harness,
    git_rev,
    load,
    run_harness,
    table,
)

OLD, NEW, TAP = "rumor-old", "rumor-new", "rumor-tap"


def ratios(recs: list[dict], conns: int, target: str,
           metric: object, base: str = OLD) -> list[tuple[int, float]]:
    """(round, target/base) for the rounds where both ran undisturbed."""
    by: dict[int, dict[str, dict]] = {}
    for x in recs:
        if x["conns"] == conns and not x.get("round_disturbed"):
            by.setdefault(x["round"], {})[x["target"]] = x
    out = []
    for r, runs in sorted(by.items()):
        if base in runs and target in runs:
            a, b = metric(runs[base]), metric(runs[target])  # type: ignore[operator]
            if a and b is not None:
                out.append((r, b / a))
    return out


def fmt(pairs: list[tuple[int, float]]) -> str:
    if not pairs:
        return "–"
    v = [p for _, p in pairs]
    return f"{statistics.median(v):.3f} [{min(v):.3f}–{max(v):.3f}] (n={len(v)})"


def tables(jsonl: Path, base: str = OLD,
           bars: tuple[tuple[str, float], ...] = ((NEW, 0.05), (TAP, 0.10))) -> str:
    """The harness's rows, then each target's ratios to ``base`` paired per round,
    held against its bar (at most that fraction fewer req/s or more CPU/req)."""
    recs, summ = load(jsonl)
    out = [f"## {jsonl}", f"rounds discarded as disturbed: "
           f"{summ.get('rounds_discarded_as_disturbed', '?')}"]
    rows = []
    for r in summ.get("rows", []):
        cpu = r.get("proxy_cpu_us_per_req") or {}
        rows.append([f"c={r['conns']}", r["target"], f"{r['rps']['median']:.0f} "
                     f"[{r['rps']['min']:.0f}–{r['rps']['max']:.0f}]",
                     f"{cpu.get('median', 0):.0f}" if cpu else "–",
                     f"{r['p50_us']['median']:.0f}", f"{r['p99_us']['median']:.0f}"])
    out.append(table(["conns", "target", "req/s", "CPU µs/req", "p50 µs", "p99 µs"], rows))
    verdict = []
    rat = []
    for conns in sorted({x["conns"] for x in recs}):
        for target, bar in bars:
            rps = ratios(recs, conns, target, lambda x: x["result"]["rps"], base)
            cpu = ratios(recs, conns, target, cpu_per_req_overhead, base)
            rat.append([f"c={conns}", f"{target} / {base}", fmt(rps), fmt(cpu)])
            if rps:
                m = statistics.median(p for _, p in rps)
                verdict.append(f"c={conns} {target} req/s {m:.3f} "
                               f"({'ok' if m >= 1 - bar else 'MISSES'} ≥ {1 - bar:.2f})")
            if cpu:
                m = statistics.median(p for _, p in cpu)
                verdict.append(f"c={conns} {target} CPU/req {m:.3f} "
                               f"({'ok' if m <= 1 + bar else 'MISSES'} ≤ {1 + bar:.2f})")
    out.append("\npaired per round, median [range]:\n\n" + table(
        ["conns", "ratio", "req/s", "CPU µs/req"], rat))
    out.append("\n**bars**: " + "; ".join(verdict))
    return "\n".join(out)


def overhead_args(ap: argparse.ArgumentParser) -> None:
    """The options of one paired ``overhead`` run (this script's and tracing_cost.py's)."""
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--conns", default="1,16")
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--results-dir")
    ap.add_argument("--harness")
    ap.add_argument("--tables-from", nargs="+", metavar="JSONL")


def run_overhead(harness: Path, res: Path, targets: list[str], cmds: list[str],
                 args: argparse.Namespace) -> Path:
    """One ``overhead`` run of the harness, ABBA, with direct and haproxy beside
    ``targets``; the records' path."""
    return run_harness(
        [sys.executable, str(harness / "bench.py"), "overhead",
         "--targets", ",".join(["direct", "haproxy", *targets]), "--host-header", "bench",
         *cmds, "--abba", "--rounds", str(args.rounds), "--conns", args.conns,
         "--duration", str(args.duration), "--results-dir", str(res)],
        res / f"harness-stdout-{int(time.time())}.jsonl")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old-python")
    ap.add_argument("--old-root")
    ap.add_argument("--new-python")
    ap.add_argument("--new-root")
    overhead_args(ap)
    args = ap.parse_args(argv)
    if args.tables_from:
        for f in args.tables_from:
            print(tables(Path(f)) + "\n")
        return 0
    for need in ("old_python", "old_root", "new_python", "new_root", "results_dir"):
        if not getattr(args, need):
            ap.error(f"--{need.replace('_', '-')} is required (or --tables-from)")
    harness = find_harness(args.harness)
    res = Path(args.results_dir).resolve()
    res.mkdir(parents=True, exist_ok=True)
    for label, py, root in ((OLD, args.old_python, args.old_root),
                            (NEW, args.new_python, args.new_root)):
        print(f"# {label}: {git_rev(root)}; rumor from {check_build(label, py, root)}")
    new_cmd = (f"{Path(args.new_python).absolute()} "
               f"{Path(args.new_root).resolve()}/bench/proxy_pair.py")
    cmds = ["--proxy-cmd", f"{OLD}={Path(args.old_python).absolute()} "
            f"{Path(args.old_root).resolve()}/bench/proxy_pair.py",
            "--proxy-cmd", f"{NEW}={new_cmd}",
            "--proxy-cmd", f"{TAP}=RUMOR_PAIR_TAP=1 {new_cmd}"]
    jsonl = run_overhead(harness, res, [OLD, NEW, TAP], cmds, args)
    print(tables(jsonl))
    print(f"# re-print with: {sys.argv[0]} --tables-from {jsonl}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
