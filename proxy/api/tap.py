"""The tap route of the local API and the ``tap`` query (``proxy/tap.py``).

- `GET /v1/tap?id=ID&service=S&path=/P&listener=&duration=10s&max=100&rate=50
  &header=NAME,NAME&timeout=1s` -> `{"id", "events": [... each with "agent", oldest
  first], "dropped": {AGENT: n}, "matched": {AGENT: n}, "open": [AGENT...], "missing",
  "errors"}`. Each call is one poll of tap `ID` on every live agent (the first opens
  it); `rumor tap` polls until its duration or its cap. `duration=0` closes it. Always
  needs the API token where one is set: a tap shows the traffic of every agent.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import msgpack

from ...gossip.cluster_query import ClusterQueries
from ...gossip.durations import parse_duration
from ...gossip.query import QueryError
from ...gossip.query import Request as QueryRequest
from ..tap import TapError, TapHub, TapRequest, read_answer, tap_request
from .access import ApiAccess
from .router import Router
from .server import HttpError, Request, Response, json_response

QUERY = "tap"


def register_tap_query(queries: ClusterQueries, hub: TapHub) -> None:
    """Answer the guarded ``tap`` query: open or poll a session on this agent."""

    def answer(r: QueryRequest) -> bytes:
        try:
            want = tap_request(r.payload)
            # Sessions are the asker's: another member naming the same id gets its own.
            doc = hub.poll(r.now, replace(want, id=f"{r.origin}/{want.id}"))
        except TapError as e:
            raise QueryError(str(e)) from None
        data: bytes = msgpack.packb(doc)
        return data

    queries.register(QUERY, answer, guarded=True)


def add_tap_routes(router: Router, queries: ClusterQueries, access: ApiAccess) -> None:
    async def tap(request: Request) -> Response:
        refused = access.token_refusal(request)
        if refused is not None:
            return refused
        q = request.query
        try:
            duration = parse_duration(q.get("duration", "10s")) if q.get("duration") != "0" \
                else 0.0
            timeout = parse_duration(q.get("timeout", "1s"))
            max_events = int(q.get("max", "100"))
            rate = float(q.get("rate", "50"))
        except ValueError as e:
            raise HttpError(400, str(e)) from None
        want = TapRequest(q.get("id", ""), q.get("service", ""), q.get("path", ""),
                          q.get("listener", ""), duration, max_events, rate,
                          tuple(h for h in q.get("header", "").split(",") if h))
        try:
            tap_request(want.payload())  # the agents would refuse it: say why here
            done = await queries.run(QUERY, want.payload(), timeout=timeout)
        except (TapError, QueryError) as e:
            raise HttpError(400, str(e)) from None
        events: list[dict[str, Any]] = []
        dropped: dict[str, int] = {}
        matched: dict[str, int] = {}
        still: list[str] = []
        errors: dict[str, str] = {}
        for agent, a in sorted(done.answers.items()):
            if not a.ok:
                errors[agent] = a.error or "failed"
                continue
            try:
                got = read_answer(a.data)
            except TapError as e:
                errors[agent] = f"bad answer: {e}"
                continue
            off = done.offset(agent)
            shift = off[0] if off is not None else 0.0
            for ev in got["events"]:
                ev["agent"] = agent
                ev["at"] -= shift  # on this agent's clock
                events.append(ev)
            dropped[agent], matched[agent] = got["dropped"], got["matched"]
            if got["open"]:
                still.append(agent)
        events.sort(key=lambda e: e["at"])
        return json_response({"id": want.id, "events": events, "dropped": dropped,
                              "matched": matched, "open": still, "missing": done.missing,
                              "errors": errors})

    router.add("GET", "/v1/tap", tap)


__all__ = ["QUERY", "add_tap_routes", "register_tap_query"]
