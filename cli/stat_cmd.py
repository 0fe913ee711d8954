"""`rumor stat`, `rumor edges` and `rumor top`: the golden metrics (``proxy/golden.py``)
of this agent, or with `--all` of the whole mesh through the `golden` query
(``proxy/api/stat.py``).

- `stat [SERVICE] [--by service|edge|route|instance]`: requests/s and success rate as
  callers saw them and per try (Linkerd's effective and actual), latency p50/p95/p99;
- `edges`: who calls whom, seen from the caller's sidecar (outbound) and the callee's
  (inbound), and whether mutual TLS carried it (inbound: the caller's certificate
  proved who it is; otherwise the name is the caller's word);
- `top`: a refreshed view of the busiest edges and routes (plain ANSI: works over ssh
  and in tmux; without a terminal it prints one frame per refresh).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any
from urllib.parse import urlencode

from ..gossip.address import format_address
from .client import get_json
from .table import render_table

BY = ("service", "edge", "route", "instance")


def add_stat_parsers(sub: Any, api_arg: Any) -> None:
    s = sub.add_parser("stat", help="golden metrics: requests/s, success, latency "
                       "quantiles, of this agent or (--all) of the whole mesh")
    api_arg(s)
    s.add_argument("service", nargs="?", default=None, help="only this service")
    s.add_argument("--by", choices=BY, default="service", help="group by (service)")
    _common(s)
    s.add_argument("--json", action="store_true", help="print the JSON document")

    e = sub.add_parser("edges", help="who calls whom, and whether mutual TLS proved it")
    api_arg(e)
    e.add_argument("service", nargs="?", default=None, help="only calls to this service")
    _common(e)
    e.add_argument("--json", action="store_true", help="print the JSON document")

    t = sub.add_parser("top", help="a live view of the busiest edges and routes")
    api_arg(t)
    t.add_argument("service", nargs="?", default=None, help="only this service")
    _common(t, window="10s")
    t.add_argument("--interval", default="2s", help="refresh every (2s)")
    t.add_argument("--rows", type=int, default=10, help="rows per table (10)")
    t.add_argument("--iterations", type=int, default=0,
                   help="stop after this many refreshes (0: until Ctrl-C)")


def _common(p: Any, window: str = "60s") -> None:
    p.add_argument("--all", action="store_true", help="the whole mesh (a cluster-wide "
                   "query), not only this agent's sidecar")
    p.add_argument("--listener", choices=("outbound", "inbound"), default=None,
                   help="only what callers' (outbound) or callees' (inbound) sidecars saw")
    p.add_argument("--window", default=window, help=f"the window, whole 5 s buckets up "
                   f"to 60s ({window})")
    p.add_argument("--end", default=None, help=argparse.SUPPRESS)
    p.add_argument("--timeout", default="2s", help="with --all: how long to collect "
                   "answers (2s)")


def fetch(args: argparse.Namespace, by: str) -> dict[str, Any]:
    params = {"by": by, "window": args.window, "timeout": args.timeout}
    if args.service:
        params["service"] = args.service
    if args.listener:
        params["listener"] = args.listener
    if args.all:
        params["all"] = "1"
    if args.end:
        params["end"] = args.end
    doc: dict[str, Any] = get_json(format_address(args.api), "/v1/stat?" + urlencode(params),
                                   timeout=120)
    return doc


def run_stat(args: argparse.Namespace) -> int:
    doc = fetch(args, args.by)
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    print(render_stat(doc))
    return 0


def run_edges(args: argparse.Namespace) -> int:
    doc = fetch(args, "edge")
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    rows = [{"src": r["source"] or "(unknown)", "dst": r["service"],
             "seen_by": "caller" if r["listener"] == "outbound" else "callee",
             "secured": _secured(r), "rps": f"{r['rps']:.2f}", "success": _pct(r["success"]),
             "p99_ms": _ms(r["p99_ms"])} for r in doc["rows"]]
    print(render_table(rows, ["src", "dst", "seen_by", "secured", "rps", "success", "p99_ms"]))
    print(_footer(doc))
    return 0


def run_top(args: argparse.Namespace) -> int:
    from ..gossip.durations import parse_duration
    try:
        interval = parse_duration(args.interval)
    except ValueError as e:
        print(f"rumor: --interval: {e}", file=sys.stderr)
        return 2
    tty = sys.stdout.isatty()
    n = 0
    try:
        while True:
            edges, routes = fetch(args, "edge"), fetch(args, "route")
            frame = render_top(edges, routes, args.rows)
            if tty:
                sys.stdout.write("\x1b[H\x1b[2J" + frame + "\n")  # home, clear: plain ANSI
            else:
                sys.stdout.write(frame + "\n\n")
            sys.stdout.flush()
            n += 1
            if args.iterations and n >= args.iterations:
                return 0
            time.sleep(interval)
    except KeyboardInterrupt:
        return 0


def render_stat(doc: dict[str, Any]) -> str:
    by = doc["by"]
    keys = {"service": ["listener", "service"], "edge": ["listener", "source", "service"],
            "route": ["listener", "service", "route"],
            "instance": ["listener", "service", "instance"]}[by]
    rows = []
    for r in doc["rows"]:
        row = {k: (r[k] or "-") for k in keys}
        row.update(success=_pct(r["success"]), rps=f"{r['rps']:.2f}",
                   actual_success=_pct(r["actual_success"]), actual_rps=f"{r['actual_rps']:.2f}",
                   p50_ms=_ms(r["p50_ms"]), p95_ms=_ms(r["p95_ms"]), p99_ms=_ms(r["p99_ms"]))
        rows.append(row)
    cols = [*keys, "success", "rps", "actual_success", "actual_rps", "p50_ms", "p95_ms",
            "p99_ms"]
    return render_table(rows, cols) + "\n" + _footer(doc)


def render_top(edges: dict[str, Any], routes: dict[str, Any], n: int) -> str:
    start, end = edges["window"]
    head = (f"rumor top — {time.strftime('%H:%M:%S', time.localtime(end))}, last "
            f"{end - start:g}s, {len(edges['agents'])} agent(s)"
            + (f", no answer from {', '.join(edges['missing'])}" if edges["missing"] else ""))
    e_rows = [{"src": r["source"] or "(unknown)", "dst": r["service"],
               "side": "out" if r["listener"] == "outbound" else "in",
               "rps": f"{r['rps']:.2f}", "success": _pct(r["success"]),
               "p50_ms": _ms(r["p50_ms"]), "p99_ms": _ms(r["p99_ms"])}
              for r in edges["rows"][:n]]
    r_rows = [{"service": r["service"], "route": r["route"] or "(default)",
               "side": "out" if r["listener"] == "outbound" else "in",
               "rps": f"{r['rps']:.2f}", "success": _pct(r["success"]),
               "actual": _pct(r["actual_success"]), "p99_ms": _ms(r["p99_ms"])}
              for r in routes["rows"][:n]]
    return "\n".join([head, "", "busiest edges",
                      render_table(e_rows, ["src", "dst", "side", "rps", "success", "p50_ms",
                                            "p99_ms"]),
                      "", "busiest routes",
                      render_table(r_rows, ["service", "route", "side", "rps", "success",
                                            "actual", "p99_ms"])])


def _secured(r: dict[str, Any]) -> str:
    if not r["secured"]:
        return "no"
    return "mTLS (certificate)" if r["listener"] == "inbound" else "mTLS"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v * 100:.2f}%"


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def _footer(doc: dict[str, Any]) -> str:
    start, end = doc["window"]
    when = time.strftime("%H:%M:%S", time.localtime(start))
    out = (f"window {when} + {end - start:g}s; {len(doc['agents'])} agent(s)"
           + (f"; no answer from {', '.join(doc['missing'])}" if doc["missing"] else ""))
    for agent, why in sorted(doc["errors"].items()):
        out += f"\n  {agent}: {why}"
    return out


__all__ = ["add_stat_parsers", "render_stat", "render_top", "run_edges", "run_stat",
           "run_top"]
