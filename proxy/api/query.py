# layer: shell — names the explain window on the wall clock (time)
"""The cluster-wide query route of the local API (``gossip/query.py``).

- `GET /v1/query/NAME?node=N1,N2&tag=K=V,K2=V2&service=S&timeout=2s&payload=TEXT` -> `{"name",
  "answers": {MEMBER: {"ok", "answer" | "error", "via", "rtt_ms", "offset_ms"}},
  "missing": [...], "expected": N}`. An answer that is msgpack is shown as its JSON,
  else as text (or base64 when it is not UTF-8).

- `GET /v1/explain/MEMBER?since=10m&timeout=3s` -> `{"member", "since", "agents":
  {AGENT: {"offset_ms", "bound_ms", "evicted", "history"}}, "errors": {AGENT: why},
  "missing", "expected", "story"}`: every agent's history about MEMBER (the `explain`
  query), each validated, with its clock offset from the round trip; "story" is the
  merged reading (``gossip/explain.py``, times on this agent's wall clock). Always
  needs the token where one is set.

A read, so `GET`; but a query this agent knows as guarded (tap, explain), a write
(the keyring's, which has its own routes) or one it does not know needs the API
token where one is set, since what it shows is the traffic or history of every
agent. Writes are refused here: they have their own routes.
"""

from __future__ import annotations

import base64
import time
from typing import Any

import msgpack

from ...gossip.builtin_queries import explain_payload
from ...gossip.cluster_query import ClusterQueries
from ...gossip.durations import parse_duration
from ...gossip.explain import explain_summary
from ...gossip.query import Answer, Pending, QueryError, new_filter
from .access import ApiAccess
from .router import Router
from .server import HttpError, Request, Response, json_response


def add_query_routes(router: Router, queries: ClusterQueries, access: ApiAccess) -> None:
    async def run(request: Request) -> Response:
        name = request.params["name"]
        reg = queries.queries.handlers.get(name)
        if reg is not None and reg.write:
            raise HttpError(409, f"{name} is a write query: use its own command")
        if queries.guarded(name):
            refused = access.token_refusal(request)
            if refused is not None:
                return refused
        q = request.query
        tags: dict[str, str] = {}
        for t in filter(None, q.get("tag", "").split(",")):
            k, sep, v = t.partition("=")
            if not sep or not k:
                raise HttpError(400, f"a tag filter is KEY=VALUE, got {t!r}")
            tags[k] = v
        try:
            timeout = parse_duration(q.get("timeout", "2s"))
        except ValueError as e:
            raise HttpError(400, str(e)) from None
        payload = q.get("payload", "").encode()
        try:
            done = await queries.run(name, payload, timeout=timeout, filter=new_filter(
                [n for n in q.get("node", "").split(",") if n], tags, q.get("service", "")))
        except QueryError as e:
            raise HttpError(400, str(e)) from None
        return json_response(summary(done))

    async def explain(request: Request) -> Response:
        refused = access.token_refusal(request)
        if refused is not None:
            return refused
        member = request.params["member"]
        q = request.query
        try:
            since = parse_duration(q.get("since", "10m"))
            timeout = parse_duration(q.get("timeout", "3s"))
        except ValueError as e:
            raise HttpError(400, str(e)) from None
        since_wall = time.time() - since
        try:
            done = await queries.run("explain", explain_payload(member, since_wall),
                                     timeout=timeout)
        except QueryError as e:
            raise HttpError(400, str(e)) from None
        return json_response(explain_summary(done, member, since_wall))

    router.add("GET", "/v1/query/{name}", run)
    router.add("GET", "/v1/explain/{member}", explain)


def summary(p: Pending) -> dict[str, Any]:
    """A finished query as the API's JSON."""
    answers = {}
    for member, a in sorted(p.answers.items()):
        off = p.offset(member)
        doc: dict[str, Any] = {"ok": a.ok, "via": a.via,
                               "rtt_ms": round((a.arrived - p.started) * 1000, 3),
                               "offset_ms": None if off is None else round(off[0] * 1000, 3)}
        if a.ok:
            doc["answer"] = shown(a)
        else:
            doc["error"] = a.error
        answers[member] = doc
    return {"name": p.name, "answers": answers, "missing": p.missing,
            "expected": len(p.expected)}


def shown(a: Answer) -> Any:
    try:
        return _jsonable(msgpack.unpackb(a.data, raw=False, strict_map_key=False))
    except (ValueError, TypeError, msgpack.UnpackException):
        try:
            return a.data.decode()
        except UnicodeDecodeError:
            return {"base64": base64.b64encode(a.data).decode()}


def _jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, bytes):
        return {"base64": base64.b64encode(v).decode()}
    return v


__all__ = ["add_query_routes", "summary"]
