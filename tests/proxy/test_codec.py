"""The data path's request codec held against h11, the reference parser.

hypothesis builds request streams — valid, malformed, and the known smuggling
shapes (CL+TE, duplicate or signed Content-Length, Transfer-Encoding not ending in
chunked or obfuscated, obs-fold, bare LF, space before colon, NUL and CR in values,
bad chunk sizes and extensions), pipelined, fed in arbitrary pieces. The invariant:
where both accept a message they agree on where it ends and what it says; the codec
may refuse what h11 accepts, but never accepts (not even the head of) a message that
h11 refuses.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import h11
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rumor.proxy.codec import (
    MAX_HEAD,
    Data,
    End,
    Head,
    ProtocolError,
    RequestReader,
    ResponseHead,
    ResponseReader,
    request_head,
)


@dataclass
class Msg:
    method: bytes
    target: bytes
    version: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes = b""
    trailers: list[tuple[bytes, bytes]] = field(default_factory=list)
    keep_alive: bool = True


@dataclass
class Parse:
    heads: list[Msg]
    complete: int  # messages whose end was reached
    error: bool


def _h11(data: bytes) -> Parse:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
    conn.receive_data(data)
    heads: list[Msg] = []
    complete = 0
    while True:
        try:
            ev = conn.next_event()
        except h11.RemoteProtocolError:
            return Parse(heads, complete, True)
        if ev is h11.NEED_DATA or isinstance(ev, h11.ConnectionClosed):
            return Parse(heads, complete, False)
        if isinstance(ev, h11.Request):
            heads.append(Msg(ev.method, ev.target, ev.http_version,
                             [(k, v) for k, v in ev.headers.raw_items()]))
            heads[-1].headers = [(k.lower(), v) for k, v in heads[-1].headers]
            heads[-1].keep_alive = h11._connection._keep_alive(ev)  # type: ignore[attr-defined]
        elif isinstance(ev, h11.Data):
            heads[-1].body += bytes(ev.data)
        elif isinstance(ev, h11.EndOfMessage):
            heads[-1].trailers = [(k.lower(), v) for k, v in ev.headers.raw_items()]
            complete += 1
            conn.send(h11.Response(status_code=200, headers=[("content-length", "0")]))
            conn.send(h11.EndOfMessage())
            if conn.our_state is h11.MUST_CLOSE or not heads[-1].keep_alive:
                return Parse(heads, complete, False)
            conn.start_next_cycle()


def _codec(data: bytes, cuts: list[int]) -> Parse:
    r = RequestReader()
    heads: list[Msg] = []
    complete = 0
    pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    for piece in [*pieces, b""]:  # the last, empty feed surfaces a deferred error
        try:
            events = r.feed(piece)
        except ProtocolError:
            return Parse(heads, complete, True)
        for ev in events:
            if isinstance(ev, Head):
                heads.append(Msg(ev.method, ev.target, ev.version, list(ev.headers),
                                 keep_alive=ev.keep_alive))
            elif isinstance(ev, Data):
                heads[-1].body += ev.data
            elif isinstance(ev, End):
                heads[-1].trailers = list(ev.trailers)
                complete += 1
                if not heads[-1].keep_alive:
                    return Parse(heads, complete, False)
    return Parse(heads, complete, False)


def _agree(data: bytes, cuts: list[int]) -> None:
    ref, got = _h11(data), _codec(data, cuts)
    n = min(len(ref.heads), len(got.heads))
    for a, b in zip(ref.heads[:n], got.heads[:n], strict=True):
        assert (a.method, a.target, a.version, a.headers) == (
            b.method, b.target, b.version, b.headers), (data, a, b)
    for a, b in zip(ref.heads[:min(ref.complete, got.complete)],
                    got.heads[:min(ref.complete, got.complete)], strict=True):
        assert (a.body, a.trailers) == (b.body, b.trailers), data
    if ref.error:
        # Never accept what h11 refuses: not one head more than h11 accepted, and no
        # message completed that h11 did not complete.
        assert len(got.heads) <= len(ref.heads), data
        assert got.complete <= ref.complete, data
    if not got.error and not ref.error:
        assert got.complete == ref.complete, data


# ---- the generator: a valid message with at most a couple of hostile parts ----------

CRLF = b"\r\n"
GOOD = {
    "method": [b"GET", b"POST", b"HEAD", b"PUT", b"DELETE", b"OPTIONS"],
    "target": [b"/", b"/a?b=c", b"/%41", b"http://x/y"],
    "version": [b"HTTP/1.1", b"HTTP/1.0"],
    "header": [b"X-A: 1", b"X-A: a\tb", b"X-A:", b"X-B: \xe9t\xe9", b"Host-X: 2",
               b"Connection: keep-alive", b"X-Long: " + b"v" * 200, b"X-A:  padded  "],
    "framing": [("cl", b"Content-Length: 3"), ("te", b"Transfer-Encoding: chunked"),
                ("none", b""), ("cl", b"Content-Length: 0")],
    "chunked": [b"3\r\nabc\r\n0\r\n\r\n", b"3;ext=1\r\nabc\r\n0\r\n\r\n",
                b"0\r\nT: 1\r\n\r\n", b"1\r\na\r\n2\r\nbc\r\n0\r\n\r\n"],
}
HOSTILE = {
    "method": [b"G ET", b"get", b"X-Y", b""],
    "target": [b"/a b", b"*", b"/\x00", b"/\xff", b""],
    "version": [b"HTTP/2.0", b"HTTP/1.2", b"HTTP/1.1 ", b"http/1.1"],
    "header": [b"X-A : 1", b" X-A: 1", b"X-A: a\x00b", b"X-A: a\rb", b"X-A: a\x01",
               b"X-A: a\x7f", b"X-A: one\r\n two", b"X-\xff: 1", b"Host: x\r\nHost: y",
               b"Connection: close", b"Expect: 100-continue",
               b"Upgrade: websocket\r\nConnection: upgrade", b"X-A\x00: 1"],
    "framing": [("cl", b"Content-Length: +3"), ("cl", b"Content-Length: -3"),
                ("cl", b"Content-Length: 3, 3"), ("cl", b"Content-Length: 3\r\nContent-Length: 3"),
                ("cl", b"Content-Length: 3\r\nContent-Length: 4"), ("cl", b"Content-Length: 0x3"),
                ("cl", b"Content-Length: 03"), ("te", b"Transfer-Encoding: Chunked"),
                ("te", b"Transfer-Encoding: gzip, chunked"),
                ("te", b"Transfer-Encoding: chunked, gzip"), ("te", b"Transfer-Encoding: gzip"),
                ("te", b"Transfer-Encoding: xchunked"), ("te", b"Transfer-Encoding:\tchunked"),
                ("te", b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked"),
                ("both", b"Content-Length: 3\r\nTransfer-Encoding: chunked")],
    "chunked": [b"03\r\nabc\r\n0\r\n\r\n", b"zz\r\nabc\r\n0\r\n\r\n",
                b"-1\r\nabc\r\n0\r\n\r\n", b"3\r\nabcd\r\n0\r\n\r\n", b"3\nabc\n0\n\n",
                b"0\r\nT : 1\r\n\r\n", b"ffffffffffffffffff\r\n", b"3 \r\nabc\r\n0\r\n\r\n",
                b"3;\x00\r\nabc\r\n0\r\n\r\n"],
    "host": [b"", b"Host: x\x00", b"Host:"],
    "eol": [b"\n", b"\r\r\n"],
    "cl_body": [b"ab", b"abcd"],
}


@st.composite
def message(draw: st.DrawFn) -> bytes:
    bad = set(draw(st.lists(st.sampled_from(sorted(HOSTILE)), max_size=2)))

    def pick(part: str) -> object:
        return draw(st.sampled_from(HOSTILE[part] if part in bad else GOOD[part]))
    eol = draw(st.sampled_from(HOSTILE["eol"])) if "eol" in bad else CRLF
    lines = [pick("method") + b" " + pick("target") + b" " + pick("version")]  # type: ignore[operator]
    host = draw(st.sampled_from(HOSTILE["host"])) if "host" in bad else b"Host: x"
    if host:
        lines.append(host)
    lines += draw(st.lists(st.sampled_from(HOSTILE["header"] if "header" in bad
                                           else GOOD["header"]), max_size=3))
    kind, line = pick("framing")  # type: ignore[misc]
    if line:
        lines.append(line)
    head = eol.join(lines) + eol + eol
    if kind in ("te", "both"):
        return head + pick("chunked")  # type: ignore[operator]
    if kind == "cl" and line.endswith(b": 0"):
        return head
    if kind == "cl":
        return head + (draw(st.sampled_from(HOSTILE["cl_body"])) if "cl_body" in bad
                       else b"abc")
    return head


@settings(max_examples=600, deadline=None)
@given(st.lists(message(), min_size=1, max_size=3), st.data())
def test_the_codec_agrees_with_h11_or_refuses(msgs: list[bytes], data: st.DataObject) -> None:
    stream = b"".join(msgs)
    cuts = sorted(set(data.draw(st.lists(st.integers(0, len(stream)), max_size=3))))
    _agree(stream, cuts)


@pytest.mark.parametrize("cut", range(0, 80, 7))
def test_an_oversized_head_is_refused_however_it_is_split(cut: int) -> None:
    stream = b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (MAX_HEAD + 10) + b"\r\n\r\n"
    r = RequestReader()
    with pytest.raises(ProtocolError) as e:
        r.feed(stream[:cut])
        r.feed(stream[cut:])
    assert e.value.status in (400, 431)


def test_pipelined_requests_come_out_in_order_with_their_bodies() -> None:
    stream = (b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"
              b"GET /b HTTP/1.1\r\nHost: x\r\n\r\n"
              b"PUT /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
              b"2\r\nhi\r\n0\r\nX-T: 1\r\n\r\n")
    got = _codec(stream, [5, 40, 90])
    assert [(m.target, m.body, m.trailers) for m in got.heads] == [
        (b"/a", b"abc", []), (b"/b", b"", []), (b"/c", b"hi", [(b"x-t", b"1")])]
    assert got.complete == 3 and not got.error


def test_request_heads_are_serialized_only_from_valid_parts() -> None:
    assert request_head(b"GET", b"/x", [(b"host", b"web")]) == \
        b"GET /x HTTP/1.1\r\nhost: web\r\n\r\n"
    for bad in ((b"G T", b"/", []), (b"GET", b"/a b", []),
                (b"GET", b"/", [(b"x", b"a\r\nb")]), (b"GET", b"/", [(b"x y", b"1")])):
        with pytest.raises(ValueError):
            request_head(*bad)  # type: ignore[arg-type]


# ---- responses ----------------------------------------------------------------------


@dataclass
class Resp:
    informational: list[int]
    status: int | None = None
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""
    trailers: list[tuple[bytes, bytes]] = field(default_factory=list)
    complete: bool = False
    error: bool = False


def _h11_response(method: bytes, data: bytes) -> Resp:
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD)
    conn.send(h11.Request(method=method, target="/", headers=[("host", "x")]))
    conn.send(h11.EndOfMessage())
    out = Resp([])
    try:
        conn.receive_data(data)
        conn.receive_data(b"")  # the upstream closes after what it sent
        while True:
            ev = conn.next_event()
            if ev is h11.NEED_DATA or ev is h11.PAUSED or isinstance(ev, h11.ConnectionClosed):
                return out
            if isinstance(ev, h11.InformationalResponse):
                out.informational.append(ev.status_code)
            elif isinstance(ev, h11.Response):
                out.status = ev.status_code
                out.headers = [(k.lower(), v) for k, v in ev.headers.raw_items()]
            elif isinstance(ev, h11.Data):
                out.body += bytes(ev.data)
            elif isinstance(ev, h11.EndOfMessage):
                out.trailers = [(k.lower(), v) for k, v in ev.headers.raw_items()]
                out.complete = True
                return out
    except h11.RemoteProtocolError:
        out.error = True
        return out


def _codec_response(method: bytes, data: bytes, cuts: list[int]) -> Resp:
    r = ResponseReader()
    r.expect(method)
    out = Resp([])
    pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    events: list[object] = []
    try:
        for piece in pieces:
            events += r.feed(piece)
        events += r.eof()  # the upstream closes after what it sent
    except ProtocolError:
        out.error = True  # unless a whole response came before the error (below)
    for ev in events:
        if isinstance(ev, ResponseHead):
            if ev.informational:
                out.informational.append(ev.status)
            else:
                out.status, out.headers = ev.status, list(ev.headers)
        elif isinstance(ev, Data):
            out.body += ev.data
        elif isinstance(ev, End) and out.status is not None:
            out.trailers, out.complete, out.error = list(ev.trailers), True, False
            break
    return out


STATUS = {
    "good": [b"HTTP/1.1 200 OK", b"HTTP/1.1 404 Not Found", b"HTTP/1.0 200 OK",
             b"HTTP/1.1 204 No Content", b"HTTP/1.1 304 Not Modified", b"HTTP/1.1 200 ",
             b"HTTP/1.1 503 Busy"],
    "bad": [b"HTTP/1.1 2000 X", b"HTTP/2 200 OK", b"HTTP/1.1 20 X", b"HTTP/1.1 OK",
            b"HTTP/1.1 200 O\x00K", b"http/1.1 200 OK"],
}


@st.composite
def response(draw: st.DrawFn) -> bytes:
    bad = set(draw(st.lists(st.sampled_from(["status", "header", "framing", "chunked",
                                             "eol", "cl_body"]), max_size=2)))

    def pick(part: str) -> object:
        return draw(st.sampled_from(HOSTILE[part] if part in bad else GOOD[part]))
    eol = draw(st.sampled_from(HOSTILE["eol"])) if "eol" in bad else CRLF
    informational = draw(st.sampled_from([b"", b"HTTP/1.1 100 Continue\r\n\r\n"]))
    lines = [draw(st.sampled_from(STATUS["bad" if "status" in bad else "good"]))]
    lines += [h for h in draw(st.lists(st.sampled_from(
        HOSTILE["header"] if "header" in bad else GOOD["header"]), max_size=3))
        if not h.lower().startswith(b"host")]
    kind, line = pick("framing")  # type: ignore[misc]
    if line:
        lines.append(line)
    head = eol.join(lines) + eol + eol
    if kind in ("te", "both"):
        body = pick("chunked")
    elif kind == "cl" and not line.endswith(b": 0"):
        body = draw(st.sampled_from(HOSTILE["cl_body"])) if "cl_body" in bad else b"abc"
    else:
        body = draw(st.sampled_from([b"", b"until close"]))
    return informational + head + body  # type: ignore[operator]


@settings(max_examples=600, deadline=None)
@given(st.sampled_from([b"GET", b"HEAD", b"POST"]), response(), st.data())
def test_the_response_codec_agrees_with_h11_or_refuses(method: bytes, data: bytes,
                                                       draw: st.DataObject) -> None:
    cuts = sorted(set(draw.draw(st.lists(st.integers(0, len(data)), max_size=3))))
    ref, got = _h11_response(method, data), _codec_response(method, data, cuts)
    if ref.error:
        assert not got.complete, (method, data, got)  # never accept what h11 refuses
        return
    if got.error:
        return  # refusing what h11 accepts is allowed
    assert got.informational == ref.informational, (method, data)
    assert (got.status, got.headers) == (ref.status, ref.headers), (method, data)
    assert got.complete == ref.complete, (method, data)
    if ref.complete:
        assert (got.body, got.trailers) == (ref.body, ref.trailers), (method, data)


def test_a_head_response_has_no_body_and_the_next_response_parses() -> None:
    r = ResponseReader()
    r.expect(b"HEAD")
    evs = r.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n")
    assert [type(e) for e in evs] == [ResponseHead, End]
    r.expect(b"GET")
    evs = r.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi")
    assert [type(e) for e in evs] == [ResponseHead, Data, End]


def test_a_close_delimited_body_ends_at_eof_and_a_short_one_is_an_error() -> None:
    r = ResponseReader()
    r.expect(b"GET")
    head, body = r.feed(b"HTTP/1.1 200 OK\r\n\r\nsome")
    assert isinstance(head, ResponseHead) and head.length is None and not head.keep_alive
    assert body == Data(b"some") and r.eof() == [End()]
    short = ResponseReader()
    short.expect(b"GET")
    short.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    with pytest.raises(ProtocolError, match="mid-response"):
        short.eof()
