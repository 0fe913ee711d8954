"""`rumor query NAME`: ask every live member (or those a filter names) and print who
answered what, and who did not answer (``proxy/api/query.py`` runs it)."""

from __future__ import annotations

import argparse
import json
from typing import Any
from urllib.parse import quote, urlencode

from ..gossip.address import format_address
from .client import get_json


def add_query_parser(sub: Any, api_arg: Any) -> None:
    q = sub.add_parser("query", help="ask every live member a named query (ping, stats, ...)")
    api_arg(q)
    q.add_argument("name", help="the query: ping, stats, or one an embedding program "
                   "registered")
    q.add_argument("--node", action="append", default=[], help="only this member "
                   "(repeatable)")
    q.add_argument("--tag", action="append", default=[], metavar="K=V",
                   help="only members with this tag (repeatable)")
    q.add_argument("--service", default="", help="only members running this service")
    q.add_argument("--timeout", default="2s", help="how long to collect answers (2s)")
    q.add_argument("--payload", default="", help="text handed to the handlers")
    q.add_argument("--json", action="store_true", help="print the JSON document")


def run_query(args: argparse.Namespace) -> int:
    params = {"timeout": args.timeout}
    for key, values in (("node", args.node), ("tag", args.tag)):
        if values:
            params[key] = ",".join(values)
    if args.service:
        params["service"] = args.service
    if args.payload:
        params["payload"] = args.payload
    doc = get_json(format_address(args.api), f"/v1/query/{quote(args.name, safe='')}?"
                   + urlencode(params), timeout=120)
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    from .table import render_table
    rows = []
    for member, a in doc["answers"].items():
        shown = a["answer"] if a["ok"] else f"error: {a['error']}"
        text = shown if isinstance(shown, str) else json.dumps(shown, sort_keys=True)
        rows.append({"member": member, "rtt_ms": f"{a['rtt_ms']:.1f}", "via": a["via"],
                     "answer": text if len(text) <= 100 else text[:97] + "..."})
    print(render_table(rows, ["member", "rtt_ms", "via", "answer"]))
    print(f"{len(doc['answers'])} answered of {doc['expected'] + 1} asked"
          + (f"; no answer from {', '.join(doc['missing'])}" if doc["missing"] else ""))
    return 0


__all__ = ["add_query_parser", "run_query"]
