"""Header rules every proxy hop applies: hop-by-hop stripping, forwarding, tracing.

A proxy relays end-to-end headers and consumes hop-by-hop ones (RFC 9110 7.6.1):
``Connection`` and every header it names, plus the classic list below. Framing
(``Content-Length``/``Transfer-Encoding``) is re-decided per hop by whoever writes
the bytes, so it is stripped here and set again by the sender.

Trailers get a stricter rule (``trailer_fields``): a trailer may not carry framing,
routing, authentication or the mesh's own fields, so those are dropped whichever way
the body goes (RFC 9110 6.5.1).

Loops are found by a mark (``hop_mark``/``check_hops``): every sidecar listener appends
its own pseudonym to ``Via`` (RFC 9110 7.6.3), and a request that arrives carrying the
listener's own mark, or more than ``MAX_HOPS`` of rumor's, is refused (508) instead of
going round again.

Tracing follows W3C Trace Context: a valid ``traceparent`` keeps its trace id and gets
a new parent id for this hop (the sidecar is a participant); a missing or malformed
one is replaced by a new trace, so every request leaving a sidecar is traceable. A new
trace is sampled by the ratio the agent was given (``--trace-sample``, default all);
a continued one keeps its caller's decision (parent-based sampling).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
    b"transfer-encoding", b"upgrade", b"proxy-authenticate", b"proxy-authorization",
    b"content-length",  # framing: set again by the writer of the next hop
})

#: Headers the mesh itself sets between sidecars; never trusted from an application.
MESH_HEADERS = frozenset({b"x-rumor-source", b"x-rumor-instance", b"x-rumor-service"})

#: Fields a trailer may never carry past a sidecar: framing, routing, connection
#: control, authentication, what the mesh itself sets, and what the sidecars manage per
#: hop. ``x-rumor-*`` is dropped by prefix.
TRAILER_FORBIDDEN = HOP_BY_HOP | frozenset({
    b"host", b"authorization", b"www-authenticate", b"cookie", b"set-cookie",
    b"content-encoding", b"content-type", b"content-range", b"expect", b"max-forwards",
    b"cache-control", b"pragma", b"range", b"age", b"expires", b"date", b"location",
    b"retry-after", b"vary", b"via", b"forwarded", b"x-forwarded-for",
    b"x-forwarded-host", b"x-forwarded-proto", b"traceparent", b"tracestate",
})
_MESH_PREFIX = b"x-rumor-"

#: Most rumor sidecars one request may pass (a request crosses two per service call;
#: an application that forwards its caller's headers carries them on).
MAX_HOPS = 16
_VIA_PROTOCOL = b"1.1"
_MARK_PREFIX = b"rumor-"

_TRACEPARENT = re.compile(rb"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")
_ZERO_TRACE = b"0" * 32
_ZERO_SPAN = b"0" * 16

SERVICE_SUFFIX = ".service.rumor"


def end_to_end(headers: list[tuple[bytes, bytes]], *,
               drop: frozenset[bytes] = frozenset()) -> list[tuple[bytes, bytes]]:
    """``headers`` (names lower-case) without hop-by-hop ones, those named by
    ``Connection``, and ``drop``."""
    named: set[bytes] = set()
    for k, v in headers:
        if k == b"connection":
            named.update(t.strip().lower() for t in v.split(b","))
    return [(k, v) for k, v in headers
            if k not in HOP_BY_HOP and k not in named and k not in drop]


def trailer_fields(trailers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The trailer fields that may pass a sidecar (see ``TRAILER_FORBIDDEN``)."""
    if not trailers:
        return trailers
    return [(k, v) for k, v in trailers
            if k not in TRAILER_FORBIDDEN and not k.startswith(_MESH_PREFIX)]


def hop_mark(ids: random.Random) -> bytes:
    """A listener's pseudonym in ``Via``: random, so that it names no host and two
    listeners (one agent's outbound and inbound among them) never share one."""
    return _MARK_PREFIX + new_id(ids, 6)


def check_hops(headers: list[tuple[bytes, bytes]], mark: bytes,
               max_hops: int = MAX_HOPS) -> str | None:
    """Why a request must not be forwarded again (a loop), or None: it already passed
    the listener whose mark is ``mark``, or more than ``max_hops`` rumor sidecars."""
    hops = 0
    for k, v in headers:
        if k != b"via":
            continue
        for entry in v.split(b","):
            parts = entry.split()
            if len(parts) < 2 or not parts[1].startswith(_MARK_PREFIX):
                continue
            if parts[1] == mark:
                return (f"loop detected: the request came back to the sidecar listener "
                        f"that already forwarded it (via {mark.decode()})")
            hops += 1
    if hops >= max_hops:
        return f"loop detected: the request passed {hops} rumor sidecars (at most {max_hops})"
    return None


def add_hop(headers: list[tuple[bytes, bytes]], mark: bytes) -> None:
    """Append this listener's mark to ``Via`` (in place)."""
    headers.append((b"via", _VIA_PROTOCOL + b" " + mark))


def response_headers(upstream: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """An upstream response's headers for the client: end-to-end ones, plus its
    Content-Length (kept so the client sees the same framing; without one the writer
    chunks)."""
    hs = end_to_end(upstream)
    for k, v in upstream:
        if k == b"content-length":
            hs.append((k, v))
            break
    return hs


def forwarded_for(headers: list[tuple[bytes, bytes]], client_host: str) -> None:
    """Append the client to ``x-forwarded-for`` (in place)."""
    for i, (k, v) in enumerate(headers):
        if k == b"x-forwarded-for":
            headers[i] = (k, v + b", " + client_host.encode())
            return
    headers.append((b"x-forwarded-for", client_host.encode()))


def new_id(ids: random.Random, nbytes: int) -> bytes:
    return b"%0*x" % (2 * nbytes, ids.getrandbits(8 * nbytes) or 1)


#: A threshold that samples every new trace (the ratio 1.0).
SAMPLE_ALL = 1 << 64


def sample_threshold(ratio: float) -> int:
    """The threshold ``continue_trace`` compares a new trace id's low 64 bits with.
    The decision is a function of the trace id (OpenTelemetry's ``TraceIdRatioBased``),
    so every sidecar and the simulator would decide a given trace alike."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"a sampling ratio is between 0 and 1, not {ratio}")
    return SAMPLE_ALL if ratio >= 1.0 else int(ratio * SAMPLE_ALL)


#: What ``continue_trace`` returns: the trace id, the caller's span id (b"" when this
#: hop starts the trace), this hop's span id (all lower-case hex), and whether the trace
#: is sampled.
TraceContext = tuple[bytes, bytes, bytes, bool]


def continue_trace(headers: list[tuple[bytes, bytes]], ids: random.Random,
                   threshold: int = SAMPLE_ALL) -> TraceContext:
    """Set this hop's ``traceparent`` (in place) and return its trace context. Trace ids
    need to be unique, not secret: ``ids`` is a generator the listener seeded once
    from the OS, which spares two getrandom() calls per request per hop.

    Sampling is parent-based: a valid ``traceparent`` keeps its flags, so the caller's
    decision stands at every hop; a new trace is sampled when its id falls below
    ``threshold`` (``sample_threshold``), and the flag tells the application so."""
    for i, (k, v) in enumerate(headers):
        if k == b"traceparent":
            m = _TRACEPARENT.match(v.strip().lower())
            if (m is not None and m.group(1) != b"ff" and m.group(2) != _ZERO_TRACE
                    and m.group(3) != _ZERO_SPAN):
                trace, flags, span = m.group(2), m.group(4), new_id(ids, 8)
                headers[i] = (k, b"00-" + trace + b"-" + span + b"-" + flags)
                return trace, m.group(3), span, int(flags, 16) & 1 == 1
            del headers[i]
            # A broken traceparent invalidates tracestate too (W3C 3.3).
            headers[:] = [(k2, v2) for k2, v2 in headers if k2 != b"tracestate"]
            break
    trace, span = new_id(ids, 16), new_id(ids, 8)
    sampled = threshold >= SAMPLE_ALL or int(trace[16:], 16) < threshold
    headers.append((b"traceparent", b"00-" + trace + b"-" + span
                    + (b"-01" if sampled else b"-00")))
    return trace, b"", span, sampled


@dataclass(frozen=True, slots=True)
class Target:
    """Where an application's request is going: a service name and the path."""

    service: str
    path: bytes  # origin-form target: /path?query
    authority: bytes  # what the upstream should see as Host


class TargetError(ValueError):
    """The request does not name a service we can route to (answered 400)."""


def cookie_value(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    """The value of cookie ``name`` in the request's ``Cookie`` headers (RFC 6265:
    ``a=1; b=2``, possibly in several headers), the first one if repeated; None when
    absent. Surrounding quotes are kept: the value is only hashed."""
    for k, v in headers:
        if k != b"cookie":
            continue
        for pair in v.split(b";"):
            key, eq, value = pair.strip().partition(b"=")
            if eq and key == name:
                return value
    return None


def parse_target(target: bytes, host: bytes | None) -> Target:
    """The service a request is for: absolute-form (``http://web/x``, proxy style) or
    origin-form with ``Host: web`` / ``web.service.rumor`` (port ignored)."""
    if target.startswith((b"http://", b"HTTP://")):
        rest = target[7:]
        slash = rest.find(b"/")
        authority, path = (rest, b"/") if slash < 0 else (rest[:slash], rest[slash:])
        q = authority.find(b"?")
        if q >= 0:  # http://web?x=1
            authority, path = authority[:q], b"/" + authority[q:]
    elif target.startswith(b"https://"):
        raise TargetError("https:// targets are not proxied; send plain HTTP to the "
                          "sidecar (sidecars encrypt between themselves)")
    elif target.startswith(b"/"):
        if not host:
            raise TargetError("no Host header: send Host: SERVICE or use the sidecar "
                              "as an HTTP proxy")
        authority, path = host, target
    else:
        raise TargetError("unsupported request target (CONNECT and * are not proxied)")
    if b"@" in authority:
        raise TargetError("credentials in the request target are not allowed")
    name = authority.rsplit(b":", 1)[0] if authority.count(b":") == 1 else authority
    try:
        text = name.decode("ascii").lower().rstrip(".")
    except UnicodeDecodeError:
        raise TargetError("service name is not ASCII") from None
    if text.endswith(SERVICE_SUFFIX):
        text = text[: -len(SERVICE_SUFFIX)]
    if not text or len(text) > 253 or not all(c.isalnum() or c in "-_." for c in text):
        raise TargetError(f"{text!r} is not a service name")
    return Target(text, path, authority)
