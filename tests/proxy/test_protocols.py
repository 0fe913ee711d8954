"""Declared protocols and how a listener tells a connection's protocol: the service
tag and member tag, ``sniff`` on first bytes (exact prefixes, property-tested), and
``serve_proxy`` handing HTTP/2, mesh TCP and HTTP/1.1 connections to the right place,
over plain TCP and (by ALPN) over mutual TLS."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from rumor.gossip.service_spec import (
    SpecError,
    parse_spec,
    registration_from_mapping,
    registration_to_mapping,
)
from rumor.proxy.identity import Identity
from rumor.proxy.protocols import (
    CARRIES_TAG,
    H2_PREFACE,
    SNIFF_BYTES,
    TCP_MAGIC,
    carries_of,
    protocol_of,
    sniff,
)
from rumor.proxy.relay import AltProtocols, Reply, Request, serve_proxy, simple_reply
from rumor.proxy.sockio import SocketIO, TlsSocketIO, Watchdog
from rumor.proxy.tls import MeshTls

from .tls_files import tls_files

# ---- declarations --------------------------------------------------------------------


def test_a_declared_protocol_travels_as_a_tag_and_reads_back() -> None:
    reg = parse_spec("name=db,port=5432,protocol=tcp,tags=primary")
    assert reg.service.tags == ("primary", "rumor.protocol=tcp")
    assert reg.service.protocol == "tcp"
    assert protocol_of(reg.service.tags) == "tcp"
    # Written back as the operator wrote it: protocol as a field, not the mesh's tag.
    doc = registration_to_mapping(reg)
    assert doc["protocol"] == "tcp" and doc["tags"] == ["primary"]
    assert registration_from_mapping(doc) == reg
    plain = parse_spec("name=web,port=80")
    assert plain.service.tags == () and plain.service.protocol == "http"
    assert "protocol" not in registration_to_mapping(plain)


@pytest.mark.parametrize(("spec", "message"), [
    ("name=db,port=1,protocol=udp", "protocol 'udp': expected one of http, http2, grpc, tcp"),
    ("name=db,port=1,tags=rumor.protocol=grpc", "tags starting with 'rumor.' are the mesh's"),
])
def test_bad_declarations_are_refused_saying_why(spec: str, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        parse_spec(spec)


def test_tags_an_older_or_newer_build_wrote_read_as_best_known() -> None:
    assert protocol_of(("rumor.protocol=quic",)) == "http"  # unknown to this build
    assert protocol_of(("x", "rumor.protocol=grpc")) == "grpc"
    assert carries_of({CARRIES_TAG: "h2,tcp"}) == {"h2", "tcp"}
    assert carries_of({CARRIES_TAG: "h3,tcp"}) == {"tcp"}
    assert carries_of({}) == frozenset()  # an agent older than the tag carries HTTP/1.1


# ---- sniff ---------------------------------------------------------------------------

_TOKEN = st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ-", min_size=1, max_size=12)


@given(_TOKEN, st.binary(max_size=64))
def test_an_http1_request_is_never_taken_for_another_protocol(method: str,
                                                              rest: bytes) -> None:
    data = method.encode() + b" /" + rest
    if data.startswith(H2_PREFACE[:len(data)]) or H2_PREFACE.startswith(data[:24]):
        return  # the preface itself ("PRI * HTTP/2.0..."), not an HTTP/1.1 request
    assert sniff(data) == "h1"


@given(st.integers(1, len(H2_PREFACE)), st.binary(max_size=32))
def test_the_preface_decides_only_once_whole(n: int, after: bytes) -> None:
    head = H2_PREFACE[:n]
    assert sniff(head) == (None if n < len(H2_PREFACE) else "h2")
    assert sniff(H2_PREFACE + after) == "h2"


@given(st.integers(1, len(TCP_MAGIC)), st.binary(max_size=32))
def test_the_tcp_magic_decides_only_once_whole(n: int, after: bytes) -> None:
    assert sniff(TCP_MAGIC[:n]) == (None if n < len(TCP_MAGIC) else "tcp")
    assert sniff(TCP_MAGIC + after) == "tcp"


@given(st.binary(min_size=1, max_size=64))
def test_sniff_decides_within_its_bound_on_any_bytes(data: bytes) -> None:
    got = sniff(data)
    if len(data) >= SNIFF_BYTES:
        assert got is not None
    if got == "h2":
        assert data.startswith(H2_PREFACE)
    if got == "tcp":
        assert data.startswith(TCP_MAGIC)


# ---- serve_proxy's dispatch ------------------------------------------------------------

async def _answer(req: Request) -> Reply:
    return simple_reply(200, "http1 " + req.target.decode())


class _Alt:
    """Records which handler got a connection, with the bytes it was handed."""

    def __init__(self) -> None:
        self.got: list[tuple[str, bytes, Identity | None]] = []

    def handler(self, name: str):  # type: ignore[no-untyped-def]
        async def serve(io: SocketIO, peer: Identity | None, first: bytes) -> None:
            self.got.append((name, first, peer))
            await io.send(name.encode())
        return serve


async def _exchange(port: int, data: bytes, *, pause_after: int = 0) -> bytes:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        if pause_after:  # the opening split over two segments
            await stream.send_all(data[:pause_after])
            await trio.sleep(0.3)
            data = data[pause_after:]
        await stream.send_all(data)
        out = b""
        with trio.move_on_after(5):
            while True:
                got = await stream.receive_some(65536)
                if not got:
                    break
                out += got
                if out in (b"h2", b"tcp") or b"http1" in out:
                    break
        return out


def test_each_protocol_reaches_its_handler_and_http1_is_served_as_before() -> None:
    alt = _Alt()

    async def main() -> None:
        wd = Watchdog()
        async with trio.open_nursery() as n:
            port = await n.start(lambda task_status: serve_proxy(
                _answer, "127.0.0.1", 0, watchdog=wd, task_status=task_status,
                alt=AltProtocols(h2=alt.handler("h2"), tcp=alt.handler("tcp"))))
            assert await _exchange(port, H2_PREFACE + b"frames") == b"h2"
            assert await _exchange(port, H2_PREFACE + b"x", pause_after=5) == b"h2"
            assert await _exchange(port, TCP_MAGIC + b"preamble") == b"tcp"
            got = await _exchange(port, b"GET /a HTTP/1.1\r\nhost: x\r\n\r\n")
            assert got.startswith(b"HTTP/1.1 200") and b"http1 /a" in got
            # "P" could begin the preface: one more byte tells a POST apart.
            got = await _exchange(port, b"POST /b HTTP/1.1\r\nhost: x\r\n"
                                        b"content-length: 0\r\n\r\n", pause_after=1)
            assert got.startswith(b"HTTP/1.1 200") and b"http1 /b" in got
            n.cancel_scope.cancel()
    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0.5))
    assert [(g[0], g[1]) for g in alt.got] == [
        ("h2", H2_PREFACE + b"frames"), ("h2", H2_PREFACE + b"x"),
        ("tcp", TCP_MAGIC + b"preamble")]


def test_without_a_handler_an_h2_preface_is_refused_as_http1() -> None:
    async def main() -> None:
        wd = Watchdog()
        async with trio.open_nursery() as n:
            port = await n.start(lambda task_status: serve_proxy(
                _answer, "127.0.0.1", 0, watchdog=wd, task_status=task_status,
                alt=AltProtocols()))
            got = await _exchange(port, H2_PREFACE)
            assert got.startswith(b"HTTP/1.1 4") or got.startswith(b"HTTP/1.1 5"), got
            n.cancel_scope.cancel()
    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0.5))



def test_alpn_h2_under_mutual_tls_goes_to_the_h2_handler_and_none_to_http1(
        tmp_path: Path) -> None:
    server = MeshTls(tls_files(tmp_path, "a", ["web"]))
    client = MeshTls(tls_files(tmp_path, "b", ["api"]))
    alt = _Alt()

    async def connect(port: int, h2: bool, data: bytes) -> tuple[str | None, bytes]:
        sock = socket.create_connection(("127.0.0.1", port))
        wd = Watchdog()
        io = TlsSocketIO(sock, wd, client.client_h2 if h2 else client.client,
                         server_side=False)
        await client.handshake(io)
        chosen = io.alpn
        await io.send(data)
        out = b""
        with trio.move_on_after(5):
            while out != b"h2" and b"http1" not in out:
                got = await io.recv()
                if not got:
                    break
                out += got
        io.close()
        return chosen, out

    async def main() -> None:
        wd = Watchdog()
        async with trio.open_nursery() as n:
            port = await n.start(lambda task_status: serve_proxy(
                _answer, "127.0.0.1", 0, watchdog=wd, tls=server, task_status=task_status,
                alt=AltProtocols(h2=alt.handler("h2"))))
            chosen, out = await connect(port, True, H2_PREFACE)
            assert (chosen, out) == ("h2", b"h2")
            chosen, out = await connect(port, False, b"GET /c HTTP/1.1\r\nhost: x\r\n\r\n")
            assert chosen is None and out.startswith(b"HTTP/1.1 200") and b"http1 /c" in out
            n.cancel_scope.cancel()
    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0.5))
    # ALPN decided before any byte was read: the preface is the handler's to read.
    assert alt.got[0][0] == "h2" and alt.got[0][1] == b""
    peer = alt.got[0][2]
    assert peer is not None and peer.node == "b"
