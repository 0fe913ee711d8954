# layer: shell — reads the wall clock and the trio clock to name a window
"""The golden-metrics routes of the local API (``proxy/golden.py``), and the ``golden``
query every agent answers with its own view.

- `GET /v1/stat?by=service|edge|route|instance&service=S&listener=outbound|inbound
  &window=60s&end=WALL&all=1&timeout=2s` -> `{"by", "window": [start, end], "seconds",
  "agents", "missing", "errors", "rows": [...]}`. Without `all`, this agent's view; with
  it, the sum of every live agent's (the `golden` query): counts added and sketches
  merged, so the quantiles are the mesh's, not an average of the agents'. A window is
  whole wall-clock buckets ending at `end` (default: the current bucket's start), so the
  same request asked of several agents adds up.

Rows: the grouping fields, `requests`, `successes`, `rps`, `success` (as callers saw it),
`tries`, `try_successes`, `actual_rps`, `actual_success` (per try), `p50_ms`, `p95_ms`,
`p99_ms`. Not guarded: rates and names, as `/metrics` shows them.
"""

from __future__ import annotations

import math
import time
from typing import Any

import msgpack
import trio

from ...gossip.cluster_query import ClusterQueries
from ...gossip.durations import parse_duration
from ...gossip.query import QueryError
from ...gossip.query import Request as QueryRequest
from ..golden import (
    BUCKET,
    BY,
    DEFAULT_WINDOW,
    GoldenMetrics,
    Snapshot,
    aligned_window,
    merge_answers,
    summarise,
    to_wire,
)
from .router import Router
from .server import HttpError, Request, Response, json_response

QUERY = "golden"


def register_golden_query(queries: ClusterQueries, golden: GoldenMetrics) -> None:
    """Answer the ``golden`` query (payload: msgpack ``[window, end]``) with this agent's
    view of that window."""

    def answer(r: QueryRequest) -> bytes:
        window, end = golden_request(r.payload)
        return to_wire(golden.snapshot(r.now, window, end))

    queries.register(QUERY, answer)


def golden_payload(window: float, end: float) -> bytes:
    data: bytes = msgpack.packb([float(window), float(end)])
    return data


def golden_request(payload: bytes) -> tuple[float, float]:
    """The window a ``golden`` payload asks for; ``QueryError`` if it is not one."""
    try:
        doc = msgpack.unpackb(payload, max_array_len=2, max_map_len=0, max_str_len=0,
                              max_bin_len=0, max_ext_len=0)
        window, end = doc
        window, end = float(window), float(end)
        if not math.isfinite(end):
            raise ValueError
        return aligned_window(window), end
    except Exception:  # msgpack and unpacking raise many types on junk
        raise QueryError("golden takes [window seconds (5-60), end wall time] as "
                         "msgpack") from None


def add_stat_routes(router: Router, golden: GoldenMetrics,
                    queries: ClusterQueries | None, agent: str) -> None:
    async def stat(request: Request) -> Response:
        q = request.query
        by = q.get("by", "service")
        if by not in BY:
            raise HttpError(400, f"by must be one of {', '.join(BY)}, got {by!r}")
        listener = q.get("listener") or None
        if listener not in (None, "outbound", "inbound"):
            raise HttpError(400, f"listener must be outbound or inbound, got {listener!r}")
        try:
            window = aligned_window(parse_duration(q.get("window", f"{DEFAULT_WINDOW:g}s")))
            timeout = parse_duration(q.get("timeout", "2s"))
            end = float(q["end"]) if q.get("end") else \
                math.floor(time.time() / BUCKET) * BUCKET
            if not math.isfinite(end):
                raise ValueError("end must be a wall-clock time in seconds")
        except ValueError as e:
            raise HttpError(400, str(e)) from None
        missing: list[str] = []
        errors: dict[str, str] = {}
        if q.get("all") in ("1", "true", "yes"):
            if queries is None:
                raise HttpError(404, "this agent runs no cluster queries")
            try:
                done = await queries.run(QUERY, golden_payload(window, end), timeout=timeout)
            except QueryError as e:
                raise HttpError(400, str(e)) from None
            snap, errors = merge_answers(done.answers, end - window, end)
            missing = done.missing
        else:
            snap = golden.snapshot(trio.current_time(), window, end)
            snap.agents = [agent]
        return json_response(stat_document(snap, by, q.get("service") or None, listener,
                                           missing, errors))

    router.add("GET", "/v1/stat", stat)


def stat_document(snap: Snapshot, by: str, service: str | None, listener: str | None,
                  missing: list[str], errors: dict[str, str]) -> dict[str, Any]:
    return {"by": by, "window": [snap.start, snap.end], "seconds": snap.seconds,
            "agents": snap.agents, "missing": missing, "errors": errors,
            "rows": summarise(snap, by, service=service, listener=listener)}


__all__ = ["QUERY", "add_stat_routes", "golden_payload", "golden_request",
           "register_golden_query", "stat_document"]
