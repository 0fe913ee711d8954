#!/usr/bin/env python3
"""What span recording and OTLP export cost the sidecar pair (issue 30), in the shared
proxy harness, against the same build with tracing off, in the same run.

One ``overhead`` run of ``shared/anchors/proxy/bench.py`` (wrk -c1 and -c16, one
backend, ``--abba``) with the targets ``direct``, ``haproxy``, ``rumor-off`` (no
``--otlp``), ``rumor-trace100`` (``--otlp`` at ``--trace-sample 1``) and
``rumor-trace1`` (``--trace-sample 0.01``). wrk sends no ``traceparent``, so the
caller's sidecar starts every trace and the ratio decides. The collector is an OTLP/HTTP
receiver in this script's own process (``rumor.cli.span_sink``, outside the pair's
process tree, so its CPU is not the pair's); it decodes every export and counts spans.
Then, paired within each round, trace/off ratios of req/s and of the pair's CPU per
request. Bars: at most 10% at 100%, 3% at 1%.

    python3 bench/tracing_cost.py --rounds 5 --results-dir /tmp/trace-cost
    python3 bench/tracing_cost.py --tables-from RESULTS/overhead-X.jsonl

Needs ``haproxy nginx wrk`` for the harness.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pipeline_ab import find_harness, git_rev
from visibility_cost import overhead_args, run_overhead, tables

from rumor.cli.span_sink import SpanSink

OFF, ALL, ONE = "rumor-off", "rumor-trace100", "rumor-trace1"
BARS = ((ALL, 0.10), (ONE, 0.03))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--python", default=sys.executable, help="the build's interpreter")
    ap.add_argument("--root", default=str(Path(__file__).resolve().parent.parent))
    overhead_args(ap)
    args = ap.parse_args(argv)
    if args.tables_from:
        for f in args.tables_from:
            print(tables(Path(f), OFF, BARS) + "\n")
        return 0
    if not args.results_dir:
        ap.error("--results-dir is required (or --tables-from)")
    harness = find_harness(args.harness)
    res = Path(args.results_dir).resolve()
    res.mkdir(parents=True, exist_ok=True)
    collector = SpanSink(keep=0)
    print(f"# build {git_rev(args.root)}; collector on 127.0.0.1:{collector.port}")
    pair = f"{Path(args.python).absolute()} {Path(args.root).resolve()}/bench/proxy_pair.py"
    otlp = f"--otlp http://127.0.0.1:{collector.port}"
    cmds = ["--proxy-cmd", f"{OFF}={pair}",
            "--proxy-cmd", f"{ALL}=RUMOR_PAIR_EXTRA='{otlp} --trace-sample 1' {pair}",
            "--proxy-cmd", f"{ONE}=RUMOR_PAIR_EXTRA='{otlp} --trace-sample 0.01' {pair}"]
    t0 = time.time()
    jsonl = run_overhead(harness, res, [OFF, ALL, ONE], cmds, args)
    print(tables(jsonl, OFF, BARS))
    print(f"\ncollector: {collector.received} spans in {collector.exports} exports "
          f"over {time.time() - t0:.0f} s")
    print(f"# re-print with: {sys.argv[0]} --tables-from {jsonl}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
