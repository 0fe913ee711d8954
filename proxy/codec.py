"""HTTP/1.1 message framing for the data path, sans-IO, on llhttp (httptools).

A ``RequestReader`` takes the bytes a client sends and returns events: a ``Head``
(method, target, headers, how the body is framed), ``Data`` for body bytes, ``End``
(with any trailers) — for every request pipelined on the connection, in order. It
raises ``ProtocolError`` (with the status to answer) for anything malformed or
dangerous (and, with 501, protocol upgrades and CONNECT, which the mesh does not
relay), and never guesses: llhttp runs in its strict mode (its lenient flags are
never set), and what llhttp tolerates but h11 refuses is refused here too — control
characters in values, a request without ``Host``, transfer codings other than a lone
``chunked`` — so the proxy never forwards a message whose end two parsers could
disagree about (``tests/proxy/test_codec.py`` holds it against h11).

Header names are lower-cased; values keep their bytes, stripped of surrounding
whitespace. The coming data path will re-serialize every head it forwards
(``request_head``), so nothing it did not parse reaches an upstream.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import httptools

#: The largest request head accepted (431 beyond), as h11's ``max_incomplete_event_size``.
MAX_HEAD = 16 * 1024
MAX_HEADERS = 128

_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
#: A field value: visible characters, obs-text, and spaces or tabs between them.
_VALUE = re.compile(rb"[\x21-\x7e\x80-\xff]+(?:[ \t]+[\x21-\x7e\x80-\xff]+)*|")
_TARGET = re.compile(rb"[\x21-\x7e]+")
_REASON = re.compile(rb"[\t\x20-\x7e\x80-\xff]*")
_OWS = b" \t"
#: The bytes a field value may hold (after its surrounding whitespace is stripped):
#: deleting them from a value leaves nothing. One C call per header, no regex.
_VALUE_BYTES = bytes([9, *range(0x20, 0x7F), *range(0x80, 0x100)])


class ProtocolError(Exception):
    """A message that is not forwarded: answer ``status`` and close the connection."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(slots=True)
class Head:
    method: bytes
    target: bytes
    #: b"1.0" or b"1.1".
    version: bytes
    #: (lower-cased name, value) in arrival order, framing headers included.
    headers: list[tuple[bytes, bytes]]
    #: The body's framing: ``length`` bytes, chunked, or none (length 0).
    length: int | None
    chunked: bool
    keep_alive: bool
    expect_continue: bool = False


@dataclass(slots=True)
class Data:
    data: bytes


@dataclass(slots=True)
class End:
    trailers: list[tuple[bytes, bytes]] = field(default_factory=list)


Event = Head | Data | End


class _MessageReader:
    """What both readers share: the header callbacks, the limits, the framing checks,
    and errors that wait until the whole messages before them have been handed out."""

    #: How this side answers a bad message and one over the limits: to the client
    #: 400 and 431; a bad response is the upstream's fault, 502.
    _BAD = 400
    _TOO_BIG = 431
    _SIDE = "request"

    def __init__(self, max_head: int, max_headers: int) -> None:
        self._max_head = max_head
        self._max_headers = max_headers
        self._events: list[Any] = []
        self._failed: ProtocolError | None = None
        self._begin()

    @property
    def failed(self) -> ProtocolError | None:
        """The error found in bytes already fed, once the messages before it are out."""
        return self._failed

    def _begin(self) -> None:
        self._in_head = False
        self._in_body = False
        self._head_size = 0
        self._headers: list[tuple[bytes, bytes]] = []
        self._trailers: list[tuple[bytes, bytes]] = []

    def _parse(self, parser: Any, data: bytes) -> list[Any]:
        try:
            parser.feed_data(data)
        except httptools.HttpParserCallbackError:
            assert self._failed is not None
        except httptools.HttpParserError as e:
            self._failed = ProtocolError(self._BAD, f"malformed {self._SIDE}: {e}")
        if self._failed is not None and not self._events:
            raise self._failed
        # After an error, what was whole before the bad bytes is still handed out, in
        # order; the error comes with the next call (the connection is not reused).
        out, self._events = self._events, []
        return out

    # ---- llhttp callbacks (raising in them stops the parser) -------------------------

    def on_message_begin(self) -> None:
        self._begin()
        self._in_head = True

    def on_header(self, name: bytes, value: bytes) -> None:
        # llhttp's strict mode already refuses a name that is not a token.
        value = value.strip(_OWS)
        if value.translate(None, _VALUE_BYTES):
            self._fail(self._BAD, f"invalid characters in the {self._SIDE} header "
                       f"{name[:64].decode('latin-1')}")
        self._add_size(len(name) + len(value) + 4)
        target = self._headers if self._in_head else self._trailers
        if len(target) >= self._max_headers:
            self._fail(self._TOO_BIG, f"more than {self._max_headers} {self._SIDE} headers")
        name = name.lower()
        if name == b"transfer-encoding":
            value = value.lower()  # a coding name is case-insensitive (as h11 says)
        target.append((name, value))

    def on_body(self, body: bytes) -> None:
        self._events.append(Data(bytes(body)))

    def on_message_complete(self) -> None:
        self._in_body = False
        self._events.append(End(self._trailers))
        self._trailers = []

    # ---- shared checks ---------------------------------------------------------------

    def _add_size(self, n: int) -> None:
        self._head_size += n
        if self._head_size > self._max_head:
            self._fail(self._TOO_BIG, f"{self._SIDE} head over {self._max_head} bytes")

    def _framing(self, te: list[bytes], cl: list[bytes], te_status: int) -> int | None:
        """The body length the framing headers give: 0 for none, None for chunked (a
        lone ``chunked`` is the only coding forwarded), or a valid Content-Length."""
        if te:
            if len(te) != 1 or te[0] != b"chunked" or cl:
                self._fail(te_status if not cl else self._BAD,
                           "only a lone Transfer-Encoding: chunked is supported")
            return None
        if cl:
            if len(cl) != 1 or not cl[0].isdigit() or len(cl[0]) > 18:
                self._fail(self._BAD, f"invalid Content-Length in the {self._SIDE}")
            return int(cl[0])
        return 0

    def _fail(self, status: int, reason: str) -> None:
        self._failed = ProtocolError(status, reason)
        raise self._failed


def _framing_headers(headers: list[tuple[bytes, bytes]]) -> tuple[
        list[bytes], list[bytes], int, bool]:
    """One pass over the headers framing depends on: Transfer-Encoding and
    Content-Length values, the number of Host headers, and ``Expect: 100-continue``."""
    te: list[bytes] = []
    cl: list[bytes] = []
    hosts = 0
    expect = False
    for k, v in headers:
        if k == b"host":
            hosts += 1
        elif k == b"content-length":
            cl.append(v)
        elif k == b"transfer-encoding":
            te.append(v)
        elif k == b"expect" and v.lower() == b"100-continue":
            expect = True
    return te, cl, hosts, expect


class RequestReader(_MessageReader):
    """The requests of one client connection, parsed as they arrive."""

    def __init__(self, max_head: int = MAX_HEAD, max_headers: int = MAX_HEADERS) -> None:
        super().__init__(max_head, max_headers)
        self._parser = httptools.HttpRequestParser(self)
        self._target = b""
        #: Bytes fed while the current head was incomplete (llhttp buffers a partial
        #: header before any callback sees it).
        self._head_bytes = 0

    def feed(self, data: bytes) -> list[Event]:
        """Events for ``data`` (possibly several messages, or none yet)."""
        if self._failed is not None:
            raise self._failed
        if self._in_head:
            self._head_bytes += len(data)
        out = self._parse(self._parser, data)
        if self._in_head and self._head_bytes > self._max_head:
            self._fail(431, f"request head over {self._max_head} bytes")
        return out

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_bytes = 0
        self._target = b""

    def on_url(self, url: bytes) -> None:
        self._target += url
        self._add_size(len(url) + 16)

    def on_headers_complete(self) -> None:
        p = self._parser
        self._in_head = False
        self._head_size = 0  # trailers are counted from here
        version = p.get_http_version().encode()
        if version not in (b"1.0", b"1.1"):
            self._fail(505, f"HTTP/{version.decode()} is not supported")
        if not _TARGET.fullmatch(self._target):
            self._fail(400, "invalid request target")
        if p.should_upgrade():
            # WebSocket upgrades and CONNECT tunnels are refused, not relayed: the mesh
            # could not see, balance, retry or account for what follows (documented).
            self._fail(501, "protocol upgrades and CONNECT are not supported")
        headers = self._headers
        te, cl, hosts, expect = _framing_headers(headers)
        if hosts > 1 or (version == b"1.1" and not hosts):
            self._fail(400, "a request has one Host header (HTTP/1.1 requires it)")
        length = self._framing(te, cl, te_status=501)
        # HTTP/1.0 keep-alive is not offered (as h11 does not): one request, then close.
        keep_alive = version == b"1.1" and p.should_keep_alive()
        self._events.append(Head(p.get_method(), self._target, version, headers, length,
                                 length is None, keep_alive, expect))


@dataclass(slots=True)
class ResponseHead:
    status: int
    reason: bytes
    version: bytes
    headers: list[tuple[bytes, bytes]]
    #: The body's framing: ``length`` bytes, chunked, until the connection closes
    #: (``length`` None and not chunked), or none (``length`` 0).
    length: int | None
    chunked: bool
    keep_alive: bool

    @property
    def informational(self) -> bool:
        """A 1xx: the final response to the same request follows."""
        return 100 <= self.status < 200


ResponseEvent = ResponseHead | Data | End


class ResponseReader(_MessageReader):
    """The responses of one upstream connection, one request at a time: call
    ``expect(method)`` before each request's response (a HEAD's has no body whatever
    its headers say), and ``eof()`` when the upstream closes."""

    _BAD = 502
    _TOO_BIG = 502
    _SIDE = "response"

    def __init__(self, max_head: int = MAX_HEAD, max_headers: int = MAX_HEADERS) -> None:
        super().__init__(max_head, max_headers)
        self._head_only = False
        self._buffer = b""  # a HEAD's response head, until its end is seen
        self._new_parser()

    def _new_parser(self) -> None:
        self._parser = httptools.HttpResponseParser(self)
        self._begin()
        self._reason = b""
        self._close_delimited = False

    def expect(self, method: bytes) -> None:
        self._head_only = method == b"HEAD"

    def feed(self, data: bytes) -> list[ResponseEvent]:
        if self._failed is not None:
            raise self._failed
        if not self._head_only:
            return self._parse(self._parser, data)
        # llhttp cannot be told a body is absent: hand it the head alone (a strict head
        # ends at the first blank line), then start a fresh parser.
        self._buffer += data
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buffer) > self._max_head:
                self._fail(502, f"response head over {self._max_head} bytes")
            return []
        head, rest = self._buffer[:end + 4], self._buffer[end + 4:]
        self._buffer = b""
        out = self._parse(self._parser, head)
        if any(isinstance(e, ResponseHead) and not e.informational for e in out):
            if not any(isinstance(e, End) for e in out[1:]):
                out.append(End())
            self._head_only = False
            self._new_parser()
        return out + (self.feed(rest) if rest else [])

    def eof(self) -> list[ResponseEvent]:
        """The upstream closed: the end of a close-delimited body, else a truncation."""
        if self._failed is not None:
            raise self._failed
        if self._close_delimited:
            self._close_delimited = self._in_body = False
            return [End()]
        if self._in_head or self._in_body or self._buffer:
            self._fail(502, "the upstream closed the connection mid-response")
        return []

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._reason = b""

    def on_status(self, reason: bytes) -> None:
        self._reason += reason
        self._add_size(len(reason) + 16)

    def on_headers_complete(self) -> None:
        p = self._parser
        self._in_head = False
        status = p.get_status_code()
        version = p.get_http_version().encode()
        if version not in (b"1.0", b"1.1"):
            self._fail(502, f"the upstream answered HTTP/{version.decode()}")
        if not _REASON.fullmatch(self._reason):
            self._fail(502, "invalid characters in the response's reason phrase")
        headers = self._headers
        te, cl, _, _ = _framing_headers(headers)
        # Framing headers must be valid even where no body follows (as h11 checks).
        framed = self._framing(te, cl, te_status=502)
        bodiless = self._head_only or 100 <= status < 200 or status in (204, 304)
        length: int | None
        if bodiless:
            length, chunked = 0, False
        elif te or cl:
            length, chunked = framed, framed is None
        else:
            length, chunked = None, False  # the body lasts until the upstream closes
        self._close_delimited = length is None and not chunked
        self._in_body = not bodiless
        keep_alive = (version == b"1.1" and p.should_keep_alive()
                      and not self._close_delimited)
        self._events.append(ResponseHead(status, self._reason, version, headers, length,
                                         chunked, keep_alive))


def request_head(method: bytes, target: bytes, headers: list[tuple[bytes, bytes]]) -> bytes:
    """An HTTP/1.1 request head from checked parts (raises ``ValueError`` otherwise)."""
    if not _TOKEN.fullmatch(method) or not _TARGET.fullmatch(target):
        raise ValueError("invalid method or target")
    parts = [method, b" ", target, b" HTTP/1.1\r\n"]
    for k, v in headers:
        if not _TOKEN.fullmatch(k) or not _VALUE.fullmatch(v):
            raise ValueError(f"invalid header {k!r}")
        parts += (k, b": ", v, b"\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


__all__ = ["MAX_HEAD", "Data", "End", "Event", "Head", "ProtocolError", "RequestReader",
           "ResponseEvent", "ResponseHead", "ResponseReader", "request_head"]
