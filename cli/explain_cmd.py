"""`rumor explain MEMBER [--since 10m]`: every agent's history about a member, merged
into one timeline on this agent's clock and read as the story of its suspicions (who
suspected it first and after which missed probes, who confirmed, whether it refuted,
who declared it failed). ``proxy/api/query.py`` gathers it; ``gossip/explain.py``
tells it; here the answers are merged again from the records, to print them."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any
from urllib.parse import quote, urlencode

from ..gossip.address import format_address
from ..gossip.explain import format_story, merge_timeline, story
from ..gossip.history import HistoryDecodeError, Record, from_wire
from .client import get_json


def add_explain_parser(sub: Any, api_arg: Any) -> None:
    e = sub.add_parser("explain", help="the story of a member's suspicions, from every "
                       "agent's history")
    api_arg(e)
    e.add_argument("member", help="the member to explain")
    e.add_argument("--since", default="10m", help="how far back to look (10m)")
    e.add_argument("--timeout", default="3s", help="how long to collect answers (3s)")
    e.add_argument("--lines", type=int, default=80, help="longest timeline to print; "
                   "decisive entries are always kept (80; 0: all)")
    e.add_argument("--json", action="store_true", help="print the JSON document")


def run_explain(args: argparse.Namespace) -> int:
    doc = get_json(format_address(args.api), f"/v1/explain/{quote(args.member, safe='')}?"
                   + urlencode({"since": args.since, "timeout": args.timeout}), timeout=120)
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    answers: list[tuple[str, float, list[Record]]] = []
    for agent, a in doc["agents"].items():
        try:
            answers.append((agent, a["offset_ms"] / 1000, from_wire(a["history"])))
        except (HistoryDecodeError, KeyError, TypeError) as e:
            doc["errors"][agent] = f"bad history: {e}"
    timeline = merge_timeline(answers)
    s = story(timeline, args.member)
    print(format_story(s, timeline, max_lines=args.lines or None, clock=_clock))
    print(f"{len(doc['agents'])} agent(s) answered of {doc['expected'] + 1} asked"
          + (f"; no answer from {', '.join(doc['missing'])}" if doc["missing"] else ""))
    for agent, why in sorted(doc["errors"].items()):
        print(f"  {agent}: {why}")
    offsets = sorted(((abs(a["offset_ms"]), agent) for agent, a in doc["agents"].items()),
                     reverse=True)
    if offsets and offsets[0][0] >= 1.0:
        print(f"clock offsets estimated from the round trip; largest {offsets[0][1]} "
              f"{doc['agents'][offsets[0][1]]['offset_ms']:+.1f} ms")
    return 0


def _clock(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) + f".{int(t % 1 * 1000):03d}"


__all__ = ["add_explain_parser", "run_explain"]
