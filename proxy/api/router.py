"""A route table for the local API: method + path pattern -> handler.

Why a table: every feature (services, policies, metrics, watches) adds a few routes,
and each should be one `router.add(...)` line next to its handler instead of another
branch in a growing if-chain. Unknown paths get 404 and known paths with another
method get 405 with an `Allow` header, both in the API's `{"error": ...}` shape.

Patterns are literal segments plus `{name}` placeholders that match exactly one
non-empty segment (`/v1/services/{name}`); captures land in `Request.params`.
Literal routes win over placeholder routes, so `/v1/services/watch` can coexist with
`/v1/services/{name}`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from .server import Handler, Request, Response, error_response

_Segment = tuple[bool, str]  # (is_placeholder, literal text or placeholder name)


@dataclasses.dataclass
class _Route:
    pattern: str
    segments: list[_Segment]
    handlers: dict[str, Handler]


class Router:
    """Dispatches requests by path, then method. Itself a `Handler`."""

    def __init__(self) -> None:
        self._routes: list[_Route] = []

    def add(self, methods: str | Iterable[str], pattern: str, handler: Handler) -> None:
        """Register `handler` for `methods` on `pattern`; GET routes also answer HEAD."""
        names = {methods} if isinstance(methods, str) else set(methods)
        names = {name.upper() for name in names}
        if "GET" in names:
            names.add("HEAD")
        route = self._find_pattern(pattern)
        if route is None:
            route = _Route(pattern, _parse(pattern), {})
            self._routes.append(route)
            # Literal segments sort before placeholders at each position.
            self._routes.sort(key=lambda r: [is_param for is_param, _ in r.segments])
        for name in names:
            if name in route.handlers:
                raise ValueError(f"route {name} {pattern} registered twice")
            route.handlers[name] = handler

    def routes(self) -> list[tuple[str, list[str]]]:
        """(pattern, sorted methods) for every route, e.g. for an index page or docs."""
        return [(r.pattern, sorted(r.handlers)) for r in self._routes]

    async def __call__(self, request: Request) -> Response:
        parts = _split(request.path)
        for route in self._routes:
            params = _match(route.segments, parts)
            if params is None:
                continue
            handler = route.handlers.get(request.method)
            if handler is None:
                allow = ", ".join(sorted(route.handlers))
                return error_response(
                    405,
                    f"method {request.method} not allowed on {request.path} (allowed: {allow})",
                    headers=[("allow", allow)],
                )
            return await handler(dataclasses.replace(request, params=params))
        return error_response(404, f"no such endpoint: {request.method} {request.path}")

    def _find_pattern(self, pattern: str) -> _Route | None:
        for route in self._routes:
            if route.pattern == pattern:
                return route
        return None


def _split(path: str) -> list[str]:
    # A trailing slash is not a different resource: /v1/members/ == /v1/members.
    return [part for part in path.split("/") if part]


def _parse(pattern: str) -> list[_Segment]:
    if not pattern.startswith("/"):
        raise ValueError(f"route pattern must start with '/': {pattern!r}")
    segments: list[_Segment] = []
    for part in _split(pattern):
        if part.startswith("{") and part.endswith("}") and len(part) > 2:
            segments.append((True, part[1:-1]))
        else:
            segments.append((False, part))
    return segments


def _match(segments: list[_Segment], parts: list[str]) -> dict[str, str] | None:
    if len(segments) != len(parts):
        return None
    params: dict[str, str] = {}
    for (is_param, text), part in zip(segments, parts, strict=True):
        if is_param:
            params[text] = part
        elif text != part:
            return None
    return params
