"""What the sidecars know of gRPC (sans-IO): statuses, ``grpc-timeout``, the sidecar's
own answers, and the HTTP/2 header rules of a hop.

A gRPC call is an HTTP/2 POST whose outcome is not its HTTP status (200 nearly always)
but ``grpc-status`` in its trailers, or in the headers of a *trailers-only* answer
(HEADERS with END_STREAM, no body). The sidecars read it to count errors, to retry
(only a trailers-only answer: nothing of it reached the client yet), and answer their
own refusals the same way, so a gRPC client sees ``UNAVAILABLE: no healthy instance of
greet`` instead of an HTTP error its library turns into ``UNKNOWN``.

Which statuses are failures follows the HTTP mapping of ``google/rpc/code.proto``:
a status whose HTTP equivalent is 5xx (UNKNOWN, DEADLINE_EXCEEDED, UNIMPLEMENTED,
INTERNAL, UNAVAILABLE, DATA_LOSS) counts as an error, as a 5xx does for HTTP; the
others (NOT_FOUND, INVALID_ARGUMENT, ...) are the caller's mistakes, answered fine.
"""

from __future__ import annotations

from dataclasses import dataclass

from .attempts import Attempts, Deliver, Wait
from .errors import ERROR_CODE_HEADER, ErrorCode
from .headers import end_to_end

OK = 0
CANCELLED = 1
UNKNOWN = 2
INVALID_ARGUMENT = 3
DEADLINE_EXCEEDED = 4
NOT_FOUND = 5
PERMISSION_DENIED = 7
RESOURCE_EXHAUSTED = 8
UNIMPLEMENTED = 12
INTERNAL = 13
UNAVAILABLE = 14

#: Status names as the gRPC spec spells them (and ``grpc_on`` in a retry policy, lower
#: case with dashes), by code.
NAMES = ("ok", "cancelled", "unknown", "invalid-argument", "deadline-exceeded",
         "not-found", "already-exists", "permission-denied", "resource-exhausted",
         "failed-precondition", "aborted", "out-of-range", "unimplemented", "internal",
         "unavailable", "data-loss", "unauthenticated")
#: code.proto's HTTP equivalents, by code.
HTTP_EQUIVALENT = (200, 499, 500, 400, 504, 404, 409, 403, 429, 400, 409, 400, 501, 500,
                   503, 500, 401)

#: The sidecar's own refusals, as gRPC statuses (the rest by HTTP status, below).
_BY_CODE = {
    ErrorCode.ACCESS_DENIED: PERMISSION_DENIED,
    ErrorCode.RATE_LIMITED: RESOURCE_EXHAUSTED,
    ErrorCode.OVERALL_TIMEOUT: DEADLINE_EXCEEDED,
    ErrorCode.UPSTREAM_TIMEOUT: DEADLINE_EXCEEDED,
    ErrorCode.LOCAL_TIMEOUT: DEADLINE_EXCEEDED,
    ErrorCode.BAD_TARGET: INVALID_ARGUMENT,
    ErrorCode.BAD_REQUEST: INTERNAL,
    ErrorCode.INTERNAL_ERROR: INTERNAL,
    ErrorCode.NOT_IMPLEMENTED: UNIMPLEMENTED,
    ErrorCode.PROTOCOL_MISMATCH: UNIMPLEMENTED,
    ErrorCode.LOOP_DETECTED: INTERNAL,
}

#: Header fields a hop never forwards on HTTP/2 (RFC 9113 8.2.2), besides those
#: ``headers.end_to_end`` drops; ``te: trailers`` is kept (gRPC requires it).
_H2_DROP = frozenset({b"host"})

#: The longest ``grpc-timeout`` value: 8 digits (the spec's TimeoutValue).
_UNITS = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}


def name(code: int) -> str:
    """The spec's name of ``code`` ("unavailable"); an unknown code is its number."""
    return NAMES[code] if 0 <= code < len(NAMES) else str(code)


def failed(code: int | None) -> bool:
    """Whether a call that ended with ``code`` failed on the server's side (its HTTP
    equivalent is 5xx; an unknown code counts as UNKNOWN); None: no status, not gRPC."""
    if code is None:
        return False
    return (HTTP_EQUIVALENT[code] if 0 <= code < len(HTTP_EQUIVALENT) else 500) >= 500


def is_grpc(headers: list[tuple[bytes, bytes]]) -> bool:
    """Whether a request is a gRPC call (``content-type: application/grpc[+proto...]``)."""
    for k, v in headers:
        if k == b"content-type":
            return v.startswith(b"application/grpc")
    return False


def status_of(headers: list[tuple[bytes, bytes]] | None) -> int | None:
    """The ``grpc-status`` in headers or trailers (None: absent or not a number)."""
    for k, v in headers or ():
        if k == b"grpc-status":
            return int(v) if v.isdigit() and len(v) <= 3 else UNKNOWN
    return None


def parse_timeout(value: bytes) -> float:
    """A ``grpc-timeout`` value in seconds: 1 to 8 ASCII digits and a unit (H, M, S, m,
    u, n). ``ValueError`` for anything else."""
    digits, unit = value[:-1], value[-1:]
    if not (1 <= len(digits) <= 8 and digits.isdigit() and unit in _UNITS):
        raise ValueError(f"grpc-timeout {value[:32]!r} is not 1-8 digits and a unit "
                         "(H, M, S, m, u, n)")
    return int(digits) * _UNITS[unit]


def format_timeout(seconds: float) -> bytes:
    """``seconds`` as a ``grpc-timeout`` value, in the finest unit that fits 8 digits
    (rounded down, at least 1 ns: the caller checks for a passed deadline)."""
    for unit, scale in ((b"n", 1e-9), (b"u", 1e-6), (b"m", 1e-3), (b"S", 1.0), (b"M", 60.0)):
        n = int(seconds / scale)
        if n < 100_000_000:
            return b"%d%b" % (max(n, 1), unit)
    return b"%dH" % min(int(seconds / 3600.0), 99_999_999)


def encode_message(message: str) -> bytes:
    """``grpc-message``: UTF-8, percent-encoded outside printable ASCII and ``%``."""
    return b"".join(bytes([c]) if 0x20 <= c <= 0x7E and c != 0x25 else b"%%%02X" % c
                    for c in message.encode("utf-8", "replace")[:1024])


def refusal_status(code: ErrorCode, http_status: int) -> int:
    """The gRPC status of a refusal the sidecar makes with ``code``: a fixed choice
    where one fits, else the spec's HTTP-to-gRPC mapping of its status."""
    found = _BY_CODE.get(code)
    if found is not None:
        return found
    if http_status in (429, 502, 503, 504):
        return UNAVAILABLE
    return {401: 16, 403: PERMISSION_DENIED, 404: UNIMPLEMENTED}.get(http_status, UNKNOWN)


def answer(status: int, message: str, code: ErrorCode | None = None,
           ) -> list[tuple[bytes, bytes]]:
    """The headers of a trailers-only answer (HTTP 200, END_STREAM) with ``status``."""
    hs = [(b"content-type", b"application/grpc"), (b"grpc-status", b"%d" % status),
          (b"grpc-message", encode_message(message))]
    if code is not None:
        hs += [(ERROR_CODE_HEADER, code.encode()),
               (b"x-rumor-error", message.encode("ascii", "replace")[:512])]
    return hs


def request_fields(headers: list[tuple[bytes, bytes]], *,
                   drop: frozenset[bytes] = frozenset()) -> list[tuple[bytes, bytes]]:
    """A request's regular fields for the next HTTP/2 hop: no connection-specific
    ones (``connection`` and what it names, ``keep-alive``, ``upgrade``, framing, ``te``
    other than ``trailers``), no ``host`` (``:authority`` says it), nor ``drop``."""
    trailers = any(k == b"te" and v.strip().lower() == b"trailers" for k, v in headers)
    hs = end_to_end(headers, drop=drop | _H2_DROP)
    if trailers:
        hs.append((b"te", b"trailers"))
    return hs


@dataclass(slots=True)
class CallAttempts(Attempts):
    """The attempt core (``attempts.py``) plus one input: a trailers-only gRPC answer."""

    def grpc_answered(self, now: float, code: int, connect_seconds: float = 0.0, *,
                      rate_limited: bool = False) -> Wait | Deliver:
        """The instance answered trailers-only with ``code``: a failure for the balancer
        and the ejector when ``failed``; retried (nothing reached the client yet) when
        the retry policy's ``grpc_on`` names it, attempts and budget allowing.
        ``rate_limited``: the callee's sidecar refused it for the mesh-wide rate limit:
        delivered, never retried nor judged (as ``responded`` does for a 429)."""
        if rate_limited:
            return self.responded(now, 429, connect_seconds, rate_limited=True)
        self._finish(now, ok=not failed(code),
                     latency=now - self._sent_at - connect_seconds)
        if self.replayable and self._retryable(f"grpc:{name(code)}"):
            wait = self._retry(now)
            if wait is not None:
                return wait
        return Deliver(self.attempt)


__all__ = [
    "DEADLINE_EXCEEDED",
    "HTTP_EQUIVALENT",
    "NAMES",
    "OK",
    "UNAVAILABLE",
    "CallAttempts",
    "answer",
    "encode_message",
    "failed",
    "format_timeout",
    "is_grpc",
    "name",
    "parse_timeout",
    "refusal_status",
    "request_fields",
    "status_of",
]
