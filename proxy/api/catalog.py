"""Catalog routes of the local API: discovery with blocking queries, registration.

- `GET /v1/catalog/services` -> `{NAME: {"tags", "versions", "instances", "passing",
  "warning", "critical"}}` of every visible service.
- `GET /v1/catalog/service/NAME` -> the instances (`Instance.to_json()`); filters
  `tag=`, `version=`, `passing=1` (no warning ones either), `critical=1` (include
  critical ones, left out by default), `near=_agent` (nearest first by this agent's
  probe RTT).
- Both are Consul-style blocking queries: with `?index=N` the answer waits until the
  index passes N or `wait` (default 5m, at most 10m; `30s`, `500ms`) elapses. Every
  answer carries the current index in `X-Rumor-Index`; pass it back to wait for the
  next change. An index from before a restart is simply older: the answer comes at once.
- `PUT /v1/agent/service/register` with a registration (the fields of a `--service`
  spec as JSON: `{"name": "web", "port": 8080, "tags": ["blue"], "check":
  "http://...", "interval": "2s"}`) -> `{"id", "checks"}`; 400 names the bad field.
- `PUT /v1/agent/service/deregister/ID` -> `{"deregistered": ID}`; 404 if unknown.
- `PUT /v1/agent/check/pass/ID` (also `warn`, `fail`; optional `?note=`) -> TTL
  heartbeat; 404 for an unknown check, 400 for a check that is not a TTL check.
- `GET /v1/agent/services` -> this agent's own services with full check state.
"""

from __future__ import annotations

from typing import Any, Protocol

from ...gossip.catalog import CatalogLimitError, Instance
from ...gossip.checks import CRITICAL, PASSING, WARNING
from ...gossip.service_spec import (
    Registration,
    SpecError,
    parse_duration,
    registration_from_mapping,
)
from .router import Router
from .server import HttpError, Request, Response, json_response, read_json

DEFAULT_WAIT = 300.0
MAX_WAIT = 600.0
INDEX_HEADER = "x-rumor-index"
_TRUE = ("1", "true", "yes", "")
_FALSE = ("0", "false", "no")


class CatalogApi(Protocol):
    """The part of `rumor.gossip.discovery.Discovery` the routes use."""

    def index(self, name: str | None = None) -> int: ...

    async def wait(self, index: int, timeout: float, name: str | None = None) -> int: ...

    def services(self) -> dict[str, dict[str, Any]]: ...

    def instances(self, name: str, *, tag: str | None = None, version: str | None = None,
                  passing: bool = False, include_critical: bool = False,
                  near: bool = False) -> list[Instance]: ...

    def register(self, reg: Registration) -> list[str]: ...

    def deregister(self, service_id: str) -> bool: ...

    def heartbeat(self, check_id: str, status: str = PASSING, output: str = "") -> None: ...

    def local_services(self) -> list[dict[str, Any]]: ...


def add_catalog_routes(router: Router, catalog: CatalogApi) -> None:
    """Register the catalog and agent-service routes on `router`."""

    async def services(request: Request) -> Response:
        index = await _block(request, catalog, None)
        return json_response(catalog.services(), headers=[(INDEX_HEADER, str(index))])

    async def service(request: Request) -> Response:
        name = request.params["name"]
        q = request.query
        near = q.get("near")
        if near is not None and near != "_agent":
            raise HttpError(400, f"near={near!r}: only near=_agent (this agent) is supported")
        passing = _flag(q, "passing")
        critical = _flag(q, "critical")
        index = await _block(request, catalog, name)
        rows = catalog.instances(name, tag=q.get("tag"), version=q.get("version"),
                                 passing=passing, include_critical=critical,
                                 near=near is not None)
        return json_response([i.to_json() for i in rows],
                             headers=[(INDEX_HEADER, str(index))])

    async def register(request: Request) -> Response:
        try:
            reg = registration_from_mapping(read_json(request))
        except SpecError as e:
            raise HttpError(400, str(e)) from e
        try:
            checks = catalog.register(reg)
        except CatalogLimitError as e:
            raise HttpError(400, f"service {reg.service.id!r}: {e}") from e
        return json_response({"id": reg.service.id, "checks": checks})

    async def deregister(request: Request) -> Response:
        sid = request.params["id"]
        if not catalog.deregister(sid):
            raise HttpError(404, f"no local service with id {sid!r}")
        return json_response({"deregistered": sid})

    def heartbeat(status: str) -> Any:
        async def handler(request: Request) -> Response:
            cid = request.params["id"]
            try:
                catalog.heartbeat(cid, status, request.query.get("note", ""))
            except KeyError:
                raise HttpError(404, f"no local check with id {cid!r}") from None
            except ValueError as e:
                raise HttpError(400, str(e)) from e
            return json_response({"check": cid, "status": status})
        return handler

    async def local(request: Request) -> Response:
        return json_response(catalog.local_services())

    router.add("GET", "/v1/catalog/services", services)
    router.add("GET", "/v1/catalog/service/{name}", service)
    router.add("PUT", "/v1/agent/service/register", register)
    router.add("PUT", "/v1/agent/service/deregister/{id}", deregister)
    router.add("PUT", "/v1/agent/check/pass/{id}", heartbeat(PASSING))
    router.add("PUT", "/v1/agent/check/warn/{id}", heartbeat(WARNING))
    router.add("PUT", "/v1/agent/check/fail/{id}", heartbeat(CRITICAL))
    router.add("GET", "/v1/agent/services", local)


async def _block(request: Request, catalog: CatalogApi, name: str | None) -> int:
    """Wait as a blocking query asks (`index`, `wait`); returns the index to report."""
    raw = request.query.get("index")
    if raw is None:
        return catalog.index(name)
    if not raw.isdigit():
        raise HttpError(400, f"index={raw!r}: expected a non-negative integer "
                        "(the X-Rumor-Index of a previous answer)")
    wait = DEFAULT_WAIT
    if "wait" in request.query:
        try:
            wait = parse_duration(request.query["wait"], "wait")
        except SpecError as e:
            raise HttpError(400, str(e)) from e
    return await catalog.wait(int(raw), min(wait, MAX_WAIT), name)


def _flag(q: dict[str, str], key: str) -> bool:
    v = q.get(key)
    if v is None:
        return False
    if v.lower() in _TRUE:
        return True
    if v.lower() in _FALSE:
        return False
    raise HttpError(400, f"{key}={v!r}: expected 1/true or 0/false")
