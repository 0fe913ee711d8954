"""Who may drive the local API: one check in front of every route.

Why a check at all, on loopback: loopback is not a boundary against a browser. Any web
page the operator opens can send requests to ``127.0.0.1`` ("simple" cross-origin
requests — GET, or POST with a ``text/plain`` body — need no preflight), and a page whose
name is re-bound to 127.0.0.1 (DNS rebinding) can even read the answers. So the API
answers only requests that a browser cannot forge:

1. ``Host`` names the API itself — a loopback address, ``localhost``, the address the
   connection arrived on, or a name from ``--api-allow-host`` — with the API's port. A
   rebound name (``Host: evil.example``) is refused: the page can send, never read.
2. A foreign ``Origin`` (any but the API's own) or ``Sec-Fetch-Site: cross-site`` is
   refused, and so is every ``OPTIONS``: no preflight is ever granted and no CORS header
   is ever sent, so a cross-origin page can only send the simple requests of (3).
3. State changes only by ``PUT``/``DELETE`` (``POST`` is routed nowhere), and a body only
   as JSON (or a signed policy envelope): both need a preflight, which (2) refuses.
4. With ``--api-token-file``, a write also needs the token (``Authorization: Bearer T``
   or ``X-Rumor-Token: T``), as Consul's ACL token: a local process that can reach the
   port still cannot change the agent.

The decision is a pure function of the request (:meth:`ApiAccess.refusal`), so tests
drive it without sockets; :func:`guarded` puts it in front of a handler.
"""

from __future__ import annotations

import hmac
import ipaddress
from dataclasses import dataclass, field

from ...gossip.fields import describe
from .server import Handler, Request, Response, error_response

#: Content types a request body may have: JSON, or a signed policy envelope. Neither
#: is a CORS-safelisted type, so a cross-origin page cannot send one unpreflighted.
BODY_TYPES = frozenset({"application/json", "application/x-rumor-envelope"})
READ_METHODS = frozenset({"GET", "HEAD"})


@dataclass(frozen=True)
class ApiAccess:
    """The API's access rules: extra host names it answers to, and the write token."""

    #: Host names (lower-case, no port) answered besides loopback and ``localhost``.
    allowed_hosts: frozenset[str] = field(default_factory=frozenset)
    #: The write token; None: writes need none (the API should then be on loopback).
    token: str | None = None

    def refusal(self, request: Request) -> Response | None:
        """The answer that refuses ``request``, or None to let it through."""
        local = request.local
        host = request.headers.get("host", "")
        if not self._names_this_api(host, local):
            return error_response(403, f"Host {describe(host)} is not this API: it answers "
                                  "only to a loopback address or localhost with its port "
                                  "(add names with --api-allow-host)")
        origin = request.headers.get("origin")
        if origin is not None and not self._is_own_origin(origin, local):
            return error_response(403, f"cross-origin request from {describe(origin)} "
                                  "refused: the local API answers only its own page (/ui/)")
        if request.headers.get("sec-fetch-site", "").lower() == "cross-site":
            return error_response(403, "cross-site request refused")
        if request.method == "OPTIONS":
            return error_response(403, "the local API grants no cross-origin access "
                                  "(preflight refused)")
        if request.body and _media_type(request) not in BODY_TYPES:
            return error_response(415, "a request body must be JSON (Content-Type: "
                                  "application/json)")
        if request.method not in READ_METHODS:
            return self.token_refusal(request)
        return None

    def token_refusal(self, request: Request) -> Response | None:
        """The answer refusing ``request`` for a missing or wrong token, whatever its
        method (a read that shows every agent's traffic needs it too), or None."""
        if self.token is not None:
            given = _token_of(request)
            if given is None:
                return error_response(401, "this agent requires an API token for changes "
                                      "(rumor --token-file FILE, or Authorization: "
                                      "Bearer TOKEN)",
                                      headers=[("www-authenticate", 'Bearer realm="rumor"')])
            if not hmac.compare_digest(given.encode(), self.token.encode()):
                return error_response(403, "wrong API token")
        return None

    def _names_this_api(self, host: str, local: tuple[str, int] | None) -> bool:
        name, port = split_host(host)
        if name is None or local is None:
            return False
        if port != local[1]:
            return False
        return (name == "localhost" or name in self.allowed_hosts or _is_loopback(name)
                or name == local[0].lower())

    def _is_own_origin(self, origin: str, local: tuple[str, int] | None) -> bool:
        scheme, sep, rest = origin.partition("://")
        return bool(sep) and scheme.lower() == "http" and "/" not in rest \
            and self._names_this_api(rest, local)


def guarded(handler: Handler, access: ApiAccess) -> Handler:
    """``handler`` behind ``access``: refused requests never reach a route."""

    async def guard(request: Request) -> Response:
        refused = access.refusal(request)
        if refused is not None:
            return refused
        return await handler(request)

    return guard


def split_host(value: str) -> tuple[str | None, int | None]:
    """``Host`` as (lower-case name, port): ``[::1]:7947`` -> ("::1", 7947); a missing
    port is 80; anything malformed is (None, None)."""
    value = value.strip().lower()
    if value.startswith("["):
        name, sep, rest = value[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            return None, None
        port_text = rest[1:] if rest else ""
    else:
        name, _, port_text = value.partition(":")
        if ":" in port_text:
            return None, None
    if not name:
        return None, None
    if not port_text:
        return name, 80
    if not port_text.isdigit() or len(port_text) > 5:
        return None, None
    return name, int(port_text)


def _is_loopback(name: str) -> bool:
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


def _token_of(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    scheme, _, value = auth.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    token = request.headers.get("x-rumor-token", "").strip()
    return token or None
