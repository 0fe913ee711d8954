"""`rumor tap [SERVICE] [--path P] [--max N] [--duration 10s]`: live summaries of the
requests every sidecar sees that match (``proxy/tap.py``), polled through the agent's
API (``proxy/api/tap.py``) until the duration ends or N arrived. The agents' sessions
end by themselves (deadline, cap, or 5 s without a poll): a tap cannot be left open."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from typing import Any
from urllib.parse import urlencode

from ..gossip.address import format_address
from ..gossip.durations import parse_duration
from .client import ApiError, get_json

POLL = 0.5


def add_tap_parser(sub: Any, api_arg: Any) -> None:
    t = sub.add_parser("tap", help="watch live request summaries from every sidecar")
    api_arg(t)
    t.add_argument("service", nargs="?", default="", help="only requests to this service")
    t.add_argument("--path", default="", help="only request targets starting with this")
    t.add_argument("--listener", choices=("outbound", "inbound"), default="",
                   help="only what callers' (outbound) or callees' (inbound) sidecars saw")
    t.add_argument("--max", type=int, default=100, help="stop after this many (100)")
    t.add_argument("--duration", default="10s", help="stop after this long (10s; at most "
                   "5m)")
    t.add_argument("--rate", type=float, default=50.0, help="at most this many summaries "
                   "per second from each agent (50; at most 100); the rest are counted")
    t.add_argument("--header", action="append", default=[], metavar="NAME",
                   help="show this request header's value (repeatable; none by default)")
    t.add_argument("--json", action="store_true", help="one JSON document per line")


def run_tap(args: argparse.Namespace) -> int:
    try:
        duration = parse_duration(args.duration)
    except ValueError as e:
        print(f"rumor: --duration: {e}", file=sys.stderr)
        return 2
    api = format_address(args.api)
    params = {"id": os.urandom(8).hex(), "service": args.service, "path": args.path,
              "listener": args.listener, "duration": f"{duration}s", "max": str(args.max),
              "rate": str(args.rate), "header": ",".join(args.header), "timeout": "1s"}
    end = time.monotonic() + duration
    shown = 0
    dropped = 0
    try:
        while True:
            doc = get_json(api, "/v1/tap?" + urlencode(params), timeout=30)
            for ev in doc["events"]:
                if shown >= args.max:
                    break
                print(json.dumps(ev) if args.json else line(ev), flush=True)
                shown += 1
            dropped += sum(doc["dropped"].values())
            if shown >= args.max or time.monotonic() >= end or not doc["open"]:
                break
            time.sleep(POLL)
    except KeyboardInterrupt:
        pass
    finally:
        # Close at once rather than wait for the agents' idle timeout (best effort: they
        # end it by themselves anyway).
        with contextlib.suppress(ApiError):
            get_json(api, "/v1/tap?" + urlencode({**params, "duration": "0"}), timeout=5)
    if not args.json:
        print(f"{shown} request(s) shown" + (f"; {dropped} more matched past the rate "
                                             f"limit" if dropped else ""), file=sys.stderr)
    return 0


def line(ev: dict[str, Any]) -> str:
    t = ev["at"]
    when = time.strftime("%H:%M:%S", time.localtime(t)) + f".{int(t % 1 * 1000):03d}"
    side = "out" if ev["listener"] == "outbound" else "in "
    text = (f"{when} {ev['agent']} {side} {ev['method']} {ev['service']}{ev['path']} "
            f"-> {ev['status']} {ev['latency_ms']:.1f}ms")
    if ev.get("instance"):
        text += f" {ev['instance']}"
    if ev.get("tries", 0) > 1:
        text += f" tries={ev['tries']}"
    if ev.get("source"):
        text += f" from={ev['source']}"
    if ev.get("code"):
        text += f" [{ev['code']}: {ev.get('reason') or ''}]"
    for k, v in (ev.get("headers") or {}).items():
        text += f" {k}={v!r}"
    return text


__all__ = ["add_tap_parser", "line", "run_tap"]
