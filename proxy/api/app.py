"""The agent's local HTTP API (JSON on loopback): what operators and `rumor` CLI call.

Routes (all bodies JSON, all errors `{"error": "..."}`):

- `GET /v1/members[?status=alive]` -> the list from `Node.members()`, optionally
  filtered by status. Same shape as `rumor members --json` (a benchmark contract).
- `GET /v1/self` -> `Node.self_info()`.
- `GET /v1/health` -> `Node.health()`; HTTP 200 when its status is "ok" and 503
  otherwise ("degraded": Lifeguard awareness is at least half its maximum, or the
  agent is leaving). The status code mirrors the body so `curl -f` and load-balancer
  checks work unchanged; the body is always the full document.
- `PUT /v1/join` with `{"addrs": ["host:port", ...]}` -> `{"joined": n}`;
  400 for malformed addresses, 502 when no seed answered (the gossip `JoinError`).
- `PUT /v1/leave` -> waits for `Node.leave()` (the leave is gossiped), answers
  `{"left": true}`, and only after that answer is written calls `on_leave` so the
  agent can exit (`on_leaving`, when given, is called as the leave starts). If the
  leave itself fails the answer is a 500 and `on_leave` is not called: the agent keeps
  running and the operator can retry or send SIGTERM.

Every request first passes `proxy/api/access.py` (Host, Origin, methods, content types
and the optional write token), so a web page the operator opens cannot drive the API.
Changes are `PUT` (or `DELETE`) only: `POST` is routed nowhere. Other features add
routes with `add_*_routes` on a `Router`. With a `catalog`, `make_api` also serves the
catalog routes of `proxy/api/catalog.py` (`/v1/catalog/...`, `/v1/agent/...`), and with
`policies` the routes of `proxy/api/policies.py` (`/v1/policies...`, `/v1/evaluate/...`),
and with `metrics` a Prometheus `GET /metrics` (`proxy/api/metrics.py`), and with
`control` the configuration routes of `proxy/api/control.py` (`/v1/agent/config`,
`/v1/agent/reload`), and with `queries` the cluster-wide queries of
`proxy/api/query.py` (`/v1/query/NAME`, `/v1/explain/MEMBER`, `/v1/tap`), and with `golden` the
golden metrics of `proxy/api/stat.py` (`/v1/stat`). Always: the read-only web UI of
`proxy/api/ui.py` (`/ui/`, `/v1/ui/state`), behind the same access rules.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from prometheus_client import CollectorRegistry

from ...gossip.address import parse_address
from ...gossip.cluster_keyring import ClusterKeyring
from ...gossip.cluster_query import ClusterQueries
from ...gossip.node import JoinError
from ..golden import GoldenMetrics
from .access import ApiAccess, guarded
from .catalog import CatalogApi, add_catalog_routes
from .control import AgentControl, add_control_routes
from .keyring import add_keyring_routes
from .metrics import add_metrics_route
from .policies import PolicyApi, add_policy_routes
from .query import add_query_routes
from .router import Router
from .server import Handler, HttpError, Request, Response, json_response, read_json
from .stat import add_stat_routes
from .tap import add_tap_routes
from .ui import add_ui_routes

MEMBER_STATUSES = ("alive", "suspect", "failed", "left")


class NodeApi(Protocol):
    """The part of `rumor.gossip.node.Node` the API uses (tests pass a fake)."""

    def members(self) -> list[dict[str, Any]]: ...

    def self_info(self) -> dict[str, Any]: ...

    def health(self) -> dict[str, Any]: ...

    async def join(self, seeds: list[str]) -> int: ...

    async def leave(self) -> None: ...


def make_api(node: NodeApi, *, on_leave: Callable[[], None],
             on_leaving: Callable[[], None] | None = None,
             catalog: CatalogApi | None = None, policies: PolicyApi | None = None,
             metrics: CollectorRegistry | None = None,
             keyring: ClusterKeyring | None = None,
             access: ApiAccess | None = None,
             control: AgentControl | None = None,
             queries: ClusterQueries | None = None,
             golden: GoldenMetrics | None = None, name: str = "") -> Handler:
    """The node (catalog, policy, metrics, keyring) routes behind the access rules;
    pass it to `serve_http`."""
    router = Router()
    add_node_routes(router, node, on_leave, on_leaving)
    if metrics is not None:
        add_metrics_route(router, metrics)
    if catalog is not None:
        add_catalog_routes(router, catalog)
    if policies is not None:
        add_policy_routes(router, policies)
    add_keyring_routes(router, keyring)
    if control is not None:
        add_control_routes(router, control)
    access = access or ApiAccess()
    if queries is not None:
        add_query_routes(router, queries, access)
        add_tap_routes(router, queries, access)
    if golden is not None:
        add_stat_routes(router, golden, queries, name)
    add_ui_routes(router, node.members, catalog, policies, name)
    return guarded(router, access)


def add_node_routes(router: Router, node: NodeApi, on_leave: Callable[[], None],
                    on_leaving: Callable[[], None] | None = None) -> None:
    """Register the membership routes on `router`."""

    async def members(request: Request) -> Response:
        wanted = request.query.get("status")
        if wanted is not None and wanted not in MEMBER_STATUSES:
            choices = ", ".join(MEMBER_STATUSES)
            raise HttpError(400, f"unknown status {wanted!r}: expected one of {choices}")
        rows = node.members()
        if wanted is not None:
            rows = [row for row in rows if row.get("status") == wanted]
        return json_response(rows)

    async def self_info(request: Request) -> Response:
        return json_response(node.self_info())

    async def health(request: Request) -> Response:
        doc = node.health()
        return json_response(doc, status=200 if doc.get("status") == "ok" else 503)

    async def join(request: Request) -> Response:
        addrs = _join_addrs(read_json(request))
        try:
            joined = await node.join(addrs)
        except JoinError as exc:
            raise HttpError(502, str(exc)) from exc
        return json_response({"joined": joined})

    async def leave(request: Request) -> Response:
        if on_leaving is not None:
            on_leaving()
        await node.leave()
        response = json_response({"left": True})
        response.on_sent = on_leave
        return response

    router.add("GET", "/v1/members", members)
    router.add("GET", "/v1/self", self_info)
    router.add("GET", "/v1/health", health)
    router.add("PUT", "/v1/join", join)
    router.add("PUT", "/v1/leave", leave)


def _join_addrs(doc: Any) -> list[str]:
    """Validate `{"addrs": [...]}` up front so a typo is a 400, not a failed join."""
    if not isinstance(doc, dict) or not isinstance(doc.get("addrs"), list):
        raise HttpError(400, 'expected {"addrs": ["host:port", ...]}')
    addrs: list[str] = doc["addrs"]
    if not addrs:
        raise HttpError(400, "addrs is empty: give at least one host:port")
    for addr in addrs:
        if not isinstance(addr, str):
            raise HttpError(400, f"addrs must be strings, got {type(addr).__name__}")
        try:
            parse_address(addr)
        except ValueError as exc:
            raise HttpError(400, str(exc)) from exc
    return addrs
