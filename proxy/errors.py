"""The closed list of reasons for the responses a sidecar makes itself (sans-IO).

Every 4xx/5xx the sidecar answers on its own (never one relayed from an instance)
carries one of these codes, in the ``x-rumor-error-code`` header and in a short JSON
body (``error_body``), so callers, logs and metrics tell "the mesh refused" from "the
service answered", and why, without parsing prose. Each code has one status (the
fault codes excepted: an injected abort answers the fault's own status, an injected
reset answers nothing) and says where it is made:

- ``outbound``: the caller's sidecar (resolving, routing, faults, balancing, tries);
- ``inbound``: the instance's sidecar (access, rate limit, the local service);
- ``listener``: either listener, before any handler runs (the request itself is bad).

A retry budget running out is not a code of its own: the answer is the last try's
failure (``upstream_reset``, ...), and the body's ``message`` says the budget stopped
the retries.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Sequence

#: The response header that carries the code.
ERROR_CODE_HEADER = b"x-rumor-error-code"
#: The content type of ``error_body``.
ERROR_CONTENT_TYPE = b"application/json"
#: ``error_body`` never returns more bytes than this.
MAX_BODY = 2048
#: At most this many instances are listed in a body (then "… and N more").
MAX_INSTANCES = 8


class ErrorCode(enum.StrEnum):
    """Why the sidecar answered a request itself; ``status``, ``doc`` and ``side``
    say with what, what it means and which sidecar makes it."""

    # outbound: resolving and routing
    BAD_TARGET = "bad_target"
    LOOP_DETECTED = "loop_detected"
    UNKNOWN_SERVICE = "unknown_service"
    NO_HEALTHY_INSTANCE = "no_healthy_instance"
    NO_INSTANCE_IN_SUBSET = "no_instance_in_subset"
    INSTANCES_DRAINING = "instances_draining"
    PROTOCOL_MISMATCH = "protocol_mismatch"
    FAULT_ABORT = "fault_abort"
    FAULT_RESET = "fault_reset"
    # outbound: balancing and tries
    BREAKER_OPEN = "breaker_open"
    PENDING_LIMIT = "pending_limit"
    UPSTREAM_CONNECT_FAILED = "upstream_connect_failed"
    UPSTREAM_RESET = "upstream_reset"
    UPSTREAM_BAD_RESPONSE = "upstream_bad_response"
    UPSTREAM_TIMEOUT = "upstream_timeout"
    OVERALL_TIMEOUT = "overall_timeout"
    # inbound
    NOT_SERVED_HERE = "not_served_here"
    ACCESS_DENIED = "access_denied"
    RATE_LIMITED = "rate_limited"
    LOCAL_CONNECT_FAILED = "local_connect_failed"
    LOCAL_RESET = "local_reset"
    LOCAL_BAD_RESPONSE = "local_bad_response"
    LOCAL_TIMEOUT = "local_timeout"
    # either listener
    BAD_REQUEST = "bad_request"
    REQUEST_TIMEOUT = "request_timeout"
    BODY_TOO_LARGE = "body_too_large"
    HEADERS_TOO_LARGE = "headers_too_large"
    INTERNAL_ERROR = "internal_error"
    NOT_IMPLEMENTED = "not_implemented"
    HTTP_VERSION_NOT_SUPPORTED = "http_version_not_supported"

    @property
    def status(self) -> int | None:
        """The response status (None: the fault's own status, or no response)."""
        return _INFO[self][0]

    @property
    def side(self) -> str:
        """``outbound``, ``inbound`` or ``listener``."""
        return _INFO[self][1]

    @property
    def doc(self) -> str:
        """One line on what it means."""
        return _INFO[self][2]


_O, _I, _L = "outbound", "inbound", "listener"
C = ErrorCode
_INFO: dict[ErrorCode, tuple[int | None, str, str]] = {
    C.BAD_TARGET: (400, _O, "the request names no service the sidecar can resolve "
                   "(absolute-form target or Host header)"),
    C.LOOP_DETECTED: (508, _O, "the request already passed this sidecar, or more than "
                      "MAX_HOPS sidecars (headers.py)"),
    C.UNKNOWN_SERVICE: (503, _O, "no instance of the service is registered anywhere in "
                        "the catalog"),
    C.NO_HEALTHY_INSTANCE: (503, _O, "the service has instances, but none is live and "
                            "passing its checks"),
    C.NO_INSTANCE_IN_SUBSET: (503, _O, "the route chose a subset (version, tags) with no "
                              "healthy instance"),
    C.INSTANCES_DRAINING: (503, _O, "every candidate instance has weight 0 (draining)"),
    C.PROTOCOL_MISMATCH: (505, _O, "the service is declared another protocol than the "
                          "request came in (tcp: an upstream port; grpc/http2: HTTP/2), or "
                          "no instance's agent carries HTTP/2 yet; also made inbound"),
    C.FAULT_ABORT: (None, _O, "a fault rule aborted the request with its own status "
                    "(never retried, counted by no breaker, ejection or budget)"),
    C.FAULT_RESET: (None, _O, "a fault rule reset the caller's connection (no response)"),
    C.BREAKER_OPEN: (503, _O, "the circuit breaker's max_requests are already in flight "
                     "to the service"),
    C.PENDING_LIMIT: (503, _O, "the circuit breaker's max_pending tries already wait for "
                      "a connection to the service"),
    C.UPSTREAM_CONNECT_FAILED: (503, _O, "the last try could not connect to the "
                                "instance's agent (refused, timed out, TLS failed)"),
    C.UPSTREAM_RESET: (502, _O, "the instance's agent closed or reset the connection "
                       "before a response"),
    C.UPSTREAM_BAD_RESPONSE: (502, _O, "the instance's agent sent a response that breaks "
                              "HTTP/1.1 (malformed, head too large)"),
    C.UPSTREAM_TIMEOUT: (504, _O, "the last try got no response within the per-try "
                         "timeout"),
    C.OVERALL_TIMEOUT: (504, _O, "the request's overall timeout passed (tries, backoff "
                        "and injected delay included)"),
    C.NOT_SERVED_HERE: (404, _I, "this agent serves no instance of the service named"),
    C.ACCESS_DENIED: (403, _I, "access policy, or the caller's certificate, does not "
                      "allow this caller to call the service"),
    C.RATE_LIMITED: (429, _I, "this instance's share of the service's mesh-wide rate "
                     "limit is used up (Retry-After says when to come back)"),
    C.LOCAL_CONNECT_FAILED: (503, _I, "the local service does not accept connections"),
    C.LOCAL_RESET: (502, _I, "the local service closed or reset the connection before "
                    "a response"),
    C.LOCAL_BAD_RESPONSE: (502, _I, "the local service sent a response that breaks "
                           "HTTP/1.1 (malformed, head too large)"),
    C.LOCAL_TIMEOUT: (504, _I, "the local service sent no response in time"),
    C.BAD_REQUEST: (400, _L, "the request breaks HTTP/1.1 (malformed head or body, "
                    "invalid characters, missing or repeated Host)"),
    C.REQUEST_TIMEOUT: (408, _L, "the request head did not arrive whole in time "
                        "(slowloris)"),
    C.BODY_TOO_LARGE: (413, _L, "the request body is larger than the sidecar accepts"),
    C.HEADERS_TOO_LARGE: (431, _L, "the request head is over max_header_bytes, or has "
                          "too many headers"),
    C.INTERNAL_ERROR: (500, _L, "the sidecar failed handling the request (a bug: see the "
                       "agent's log)"),
    C.NOT_IMPLEMENTED: (501, _L, "protocol upgrades, CONNECT and unknown "
                        "transfer-codings are not supported"),
    C.HTTP_VERSION_NOT_SUPPORTED: (505, _L, "the request is not HTTP/1.0 or HTTP/1.1"),
}
del C

#: The listener's own refusals (``codec.ProtocolError.status``) by status.
_LISTENER_BY_STATUS = {c.status: c for c in ErrorCode if c.side == _L}


def listener_code(status: int) -> ErrorCode:
    """The code of a request the listener refuses with ``status`` (the codec's or the
    relay's ``ProtocolError``); ``internal_error`` for a status not its own."""
    return _LISTENER_BY_STATUS.get(status, ErrorCode.INTERNAL_ERROR)


def try_failure_code(condition: str, *, inbound: bool,
                     bad_response: bool = False) -> ErrorCode:
    """The code of a last try that got no response: ``condition`` is the retry
    condition (``connect-failure``, ``502``, ``504``; ``pool.TryFailed.condition``);
    ``bad_response``: the 502 was a malformed response, not a reset (the pool's
    ``ProtocolError``)."""
    if condition == "504":
        return ErrorCode.LOCAL_TIMEOUT if inbound else ErrorCode.UPSTREAM_TIMEOUT
    if condition == "502":
        if bad_response:
            return ErrorCode.LOCAL_BAD_RESPONSE if inbound else ErrorCode.UPSTREAM_BAD_RESPONSE
        return ErrorCode.LOCAL_RESET if inbound else ErrorCode.UPSTREAM_RESET
    return ErrorCode.LOCAL_CONNECT_FAILED if inbound else ErrorCode.UPSTREAM_CONNECT_FAILED


# ---- the body -------------------------------------------------------------------------------

#: C0 and C1 control characters (and DEL) become "?": they would be escaped six bytes
#: each, and have no business in a reason.
_CONTROLS = {c: "?" for c in (*range(0x20), *range(0x7F, 0xA0))}
#: Byte budgets of the fields (UTF-8, before JSON escaping), halved until the body fits.
_BUDGETS = {"message": 512, "agent": 128, "service": 256, "last_failure": 384,
            "policy": 128, "instance": 128}


def _clip(value: object, budget: int) -> str:
    text = value if isinstance(value, str) else str(value)
    raw = text.translate(_CONTROLS).encode("utf-8", "replace")  # lone surrogates: "?"
    if len(raw) <= budget:
        return raw.decode("utf-8")
    return raw[:max(0, budget - 3)].decode("utf-8", "ignore") + "…"


def error_body(code: ErrorCode, *, agent: str | None = None, service: str | None = None,
               phrase: str | None = None, tries: int | None = None,
               instances: Sequence[str] | None = None, last_failure: str | None = None,
               policy: str | None = None) -> bytes:
    """The JSON body of a self-made answer: ``{"error": code, "message": phrase,
    "agent", "service", "tries", "instances", "last_failure", "policy"}``, keys whose
    value is None left out. Strings are cut to a byte budget (control characters
    replaced), at most ``MAX_INSTANCES`` instances are listed, and the whole is valid
    JSON of at most ``MAX_BODY`` bytes whatever the input."""
    scale = 1
    while True:
        body = _encode(code, scale, agent=agent, service=service, phrase=phrase,
                       tries=tries, instances=instances, last_failure=last_failure,
                       policy=policy)
        if len(body) <= MAX_BODY or scale >= 64:
            break
        scale *= 2
    if len(body) > MAX_BODY:  # unreachable with these budgets; never send more anyway
        body = json.dumps({"error": str(code)[:64]}).encode()
    return body


def _encode(code: ErrorCode, scale: int, *, agent: str | None, service: str | None,
            phrase: str | None, tries: int | None, instances: Sequence[str] | None,
            last_failure: str | None, policy: str | None) -> bytes:
    def budget(name: str) -> int:
        return max(16, _BUDGETS[name] // scale)

    out: dict[str, object] = {"error": _clip(str(code), 64)}
    if phrase is not None:
        out["message"] = _clip(phrase, budget("message"))
    if agent is not None:
        out["agent"] = _clip(agent, budget("agent"))
    if service is not None:
        out["service"] = _clip(service, budget("service"))
    if tries is not None and isinstance(tries, int) and not isinstance(tries, bool):
        out["tries"] = min(max(tries, 0), 1_000_000)
    if instances is not None:
        if isinstance(instances, str):  # one name, not a sequence of characters
            instances = [instances]
        listed = list(instances[:MAX_INSTANCES])
        names = [_clip(i, budget("instance")) for i in listed]
        if len(instances) > MAX_INSTANCES:
            names.append(f"… and {len(instances) - MAX_INSTANCES} more")
        out["instances"] = names
    if last_failure is not None:
        out["last_failure"] = _clip(last_failure, budget("last_failure"))
    if policy is not None:
        out["policy"] = _clip(policy, budget("policy"))
    return json.dumps(out, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


__all__ = ["ERROR_CODE_HEADER", "ERROR_CONTENT_TYPE", "MAX_BODY", "MAX_INSTANCES",
           "ErrorCode", "error_body", "listener_code", "try_failure_code"]
