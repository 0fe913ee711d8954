#!/usr/bin/env python3
"""Instructions per request of the golden-metrics observer (``proxy/golden.py``),
counted by valgrind's callgrind (deterministic: the same count whatever the machine is
doing), with the loop around it subtracted.

    python3 bench/golden_cost.py            # needs valgrind; prints instructions/request
    python3 bench/golden_cost.py --inner MODE N   # what callgrind runs (MODE: none, try,
                                                   # end, both, key)

``try`` is ``try_ended`` (one try), ``end`` is ``request_ended``, ``both`` the two, as
the outbound sidecar calls them for a request; ``key`` is the DDSketch mapping's
``key()`` alone. To count another build, put its tree first:
``PYTHONPATH=/path/to/tree/.typecheck python3 bench/golden_cost.py``.
"""

from __future__ import annotations

import argparse
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path


def inner(mode: str, n: int) -> None:
    from ddsketch.mapping import LogarithmicMapping

    from rumor.proxy.attempts import Endpoint
    from rumor.proxy.golden import ACCURACY, GoldenMetrics
    from rumor.proxy.observe import Exchange

    key = LogarithmicMapping(ACCURACY).key

    ep = Endpoint("callee0/b1", "callee0", "b1", "", (), "127.0.0.1", 1, None)
    g = GoldenMetrics(lambda: 1.8e9, 1000.0)
    rng = random.Random(1)
    xs = []
    for _ in range(1000):
        x = Exchange("outbound", b"GET", b"/", "c", 1000.0, service="bench", source="loadgen")
        x.status, x.instance = 200, "callee0/b1"
        x.headers_at = 1000.0 + rng.lognormvariate(-6, 0.8)
        xs.append(x)
    for i in range(n):
        x = xs[i % 1000]
        now = x.headers_at + 0.0001  # type: ignore[operator]
        if mode in ("try", "both"):
            g.try_ended(x, ep, now, "200")
        if mode in ("end", "both"):
            g.request_ended(x, now, 5, True)
        if mode == "key":
            key(0.001)


def count(mode: str, n: int) -> int:
    out = subprocess.run(["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
                          sys.executable, str(Path(__file__).resolve()), "--inner", mode,
                          str(n)],
                         capture_output=True, text=True, check=True).stderr
    m = re.search(r"refs:\s+([\d,]+)", out)
    if m is None:
        raise SystemExit(f"no instruction count in valgrind's output:\n{out}")
    return int(m.group(1).replace(",", ""))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--inner", nargs=2, metavar=("MODE", "N"))
    ap.add_argument("-n", type=int, default=20000)
    args = ap.parse_args()
    if args.inner:
        inner(args.inner[0], int(args.inner[1]))
        return 0
    if shutil.which("valgrind") is None:
        raise SystemExit("needs valgrind (apt-get install valgrind)")
    base = count("none", args.n)
    for mode in ("both", "try", "end", "key"):
        print(f"{mode}: {(count(mode, args.n) - base) / args.n:,.0f} instructions per request")
    return 0


if __name__ == "__main__":
    sys.exit(main())
