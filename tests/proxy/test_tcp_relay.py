"""The mesh TCP shells in process: the relay's half-close both ways (plain and over
TLS), its idle timeout on a virtual clock, and the inbound handler's preamble caps (a
slow or oversized preamble is refused and the local service is never connected)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest
import trio
import trio.testing

from rumor.policy.evaluate import Evaluator
from rumor.proxy.attempts import Endpoint
from rumor.proxy.ca import init_ca, issue
from rumor.proxy.mesh_view import LocalInstance
from rumor.proxy.protocols import TCP_MAGIC
from rumor.proxy.sockio import SocketIO, TlsSocketIO, Watchdog
from rumor.proxy.tcp_inbound import PREAMBLE_TIMEOUT, TcpInbound
from rumor.proxy.tcp_metrics import TcpMetrics
from rumor.proxy.tcp_preamble import VERSION, AnswerReader, Preamble, Refusal
from rumor.proxy.tcp_relay import relay
from rumor.proxy.tls import MeshTls, TlsFiles


def _pair(wd: Watchdog) -> tuple[SocketIO, SocketIO]:
    a, b = socket.socketpair()
    return SocketIO(a, wd), SocketIO(b, wd)


async def _read_all(io: SocketIO) -> bytes:
    out = b""
    while data := await io.recv():
        out += data
    return out


# Real socket I/O: the virtual clock jumps only after a real pause.
REAL_IO = trio.testing.MockClock(autojump_threshold=0.2)


def test_client_half_close_reaches_the_server_and_its_answer_still_flows() -> None:
    async def main() -> None:
        wd = Watchdog()
        app, near = _pair(wd)
        far, service = _pair(wd)
        got: dict[str, object] = {}

        async def server() -> None:
            got["request"] = await _read_all(service)  # ends only at the client's EOF
            await service.send(b"answer after EOF")
            service.shutdown_write()

        async def client() -> None:
            await app.send(b"request")
            app.shutdown_write()
            got["answer"] = await _read_all(app)

        async with trio.open_nursery() as n:
            n.start_soon(server)
            n.start_soon(client)
            got["relayed"] = await relay(near, far)
        assert got["request"] == b"request"
        assert got["answer"] == b"answer after EOF"
        done = got["relayed"]
        assert done.sent == 7 and done.received == 16 and done.ended == "closed"  # type: ignore[attr-defined]
    trio.run(main, clock=REAL_IO)


def test_server_half_close_keeps_the_client_direction_open() -> None:
    async def main() -> None:
        wd = Watchdog()
        app, near = _pair(wd)
        far, service = _pair(wd)
        got: dict[str, bytes] = {}

        async def server() -> None:
            await service.send(b"220 greeting")
            service.shutdown_write()  # says all it will say, still listens
            got["heard"] = await _read_all(service)

        async def client() -> None:
            got["greeting"] = await _read_all(app)
            await app.send(b"late words")
            app.shutdown_write()

        async with trio.open_nursery() as n:
            n.start_soon(server)
            n.start_soon(client)
            await relay(near, far)
        assert got == {"greeting": b"220 greeting", "heard": b"late words"}
    trio.run(main, clock=REAL_IO)


@pytest.fixture(scope="module")
def tls_pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[MeshTls, MeshTls]]:
    d = tmp_path_factory.mktemp("tls")
    init_ca(d / "ca", "test")

    def files(node: str, services: list[str]) -> TlsFiles:
        cert, key = issue(d / "ca", node, services, 30, d / node)
        return TlsFiles(d / "ca" / "ca.crt", cert, key)
    yield MeshTls(files("a", ["db"])), MeshTls(files("b", ["web"]))


def test_tls_half_close_sends_close_notify_and_keeps_reading(
        tls_pair: tuple[MeshTls, MeshTls]) -> None:
    """Over TLS an EOF is a close_notify; after sending one, the side still reads."""
    server_tls, client_tls = tls_pair

    async def main() -> None:
        wd = Watchdog()
        s, c = socket.socketpair()
        got: dict[str, bytes] = {}

        async def server() -> None:
            io, _ = await server_tls.accept(s, wd)
            got["request"] = await _read_all(io)  # the close_notify ends it
            await io.send(b"x" * 200_000)  # still welcome after the peer's close_notify
            await io.close_write()
            io.close()

        async def client() -> None:
            io = TlsSocketIO(c, wd, client_tls.client, server_side=False)
            await client_tls.handshake(io)
            await io.send(b"query")
            await io.close_write()
            got["answer"] = await _read_all(io)
            io.close()

        async with trio.open_nursery() as n:
            n.start_soon(server)
            n.start_soon(client)
        assert got["request"] == b"query"
        assert got["answer"] == b"x" * 200_000
    trio.run(main, clock=REAL_IO)


def test_an_idle_connection_is_closed_at_the_idle_timeout_and_traffic_defers_it() -> None:
    async def main() -> None:
        wd = Watchdog()
        app, near = _pair(wd)
        far, service = _pair(wd)

        async def trickle() -> None:
            for _ in range(5):  # one byte every 40 s, from one side only
                await trio.sleep(40)
                await service.send(b".")

        start = trio.current_time()
        async with trio.open_nursery() as n:
            n.start_soon(trickle)
            done = await relay(near, far, idle=60)
            n.cancel_scope.cancel()
        took = trio.current_time() - start
        assert done.ended == "idle"
        assert done.received == 5
        # last byte at 200 s, idle 60 s later (the deadline moves at most once a second)
        assert 259 <= took <= 261
        for io in (app, near, far, service):
            io.close()
    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


class _Mesh:
    """One local tcp instance at an address nothing listens on (a connect would fail
    and be counted; the tests check it is never tried)."""

    version = 0

    def __init__(self) -> None:
        self.asked = 0

    def endpoints(self, service: str) -> list[Endpoint]:
        return []

    def knows(self, service: str) -> bool:
        return service == "db"

    def local_instances(self, service: str) -> Iterator[LocalInstance]:
        self.asked += 1
        if service == "db":
            yield LocalInstance("db-1", "127.0.0.1", 9, 1, "n/db-1", "tcp")


NO_POLICY = Evaluator([])


def _inbound(mesh: _Mesh, wd: Watchdog, ev: Evaluator = NO_POLICY) -> TcpInbound:
    return TcpInbound(mesh, lambda: ev, watchdog=wd, metrics=TcpMetrics())


def test_a_slow_preamble_is_dropped_at_its_time_cap() -> None:
    async def main() -> None:
        wd = Watchdog()
        caller, io = _pair(wd)
        mesh = _Mesh()
        inbound = _inbound(mesh, wd)
        start = trio.current_time()
        async with trio.open_nursery() as n:
            n.start_soon(wd.run)
            # Half a preamble, then silence.
            await inbound(io, None, TCP_MAGIC + Preamble("db", "", "").encode()[:4])
            n.cancel_scope.cancel()
        assert PREAMBLE_TIMEOUT <= trio.current_time() - start <= PREAMBLE_TIMEOUT + 0.1
        assert mesh.asked == 0  # never routed, never connected
        assert inbound.metrics.inbound.values == {
            ("unknown", "preamble_timeout", "unverified"): 1}
        io.close()
        caller.close()
    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_an_oversized_preamble_is_refused_by_its_length_field() -> None:
    async def main() -> None:
        wd = Watchdog()
        caller, io = _pair(wd)
        mesh = _Mesh()
        inbound = _inbound(mesh, wd)
        head = bytes((VERSION,)) + (60_000).to_bytes(2, "big") + b"x" * 100
        await inbound(io, None, TCP_MAGIC + head)
        io.close()
        answer = AnswerReader().feed(await _read_all(caller))
        assert answer is not None and answer[0].code is Refusal.BAD_PREAMBLE
        assert "at most 1024" in answer[0].phrase
        assert mesh.asked == 0
        caller.close()
    trio.run(main, clock=REAL_IO)


def test_a_service_not_declared_tcp_is_refused_without_connecting() -> None:
    class HttpMesh(_Mesh):
        def local_instances(self, service: str) -> Iterator[LocalInstance]:
            yield LocalInstance("web-1", "127.0.0.1", 9, 1, "n/web-1", "http")

    async def main() -> None:
        wd = Watchdog()
        caller, io = _pair(wd)
        inbound = _inbound(HttpMesh(), wd)
        await inbound(io, None, TCP_MAGIC + Preamble("web", "", "api").encode())
        io.close()
        answer = AnswerReader().feed(await _read_all(caller))
        assert answer is not None and answer[0].code is Refusal.NOT_TCP
        caller.close()
    trio.run(main, clock=REAL_IO)


def test_the_local_service_unreachable_is_answered_so(tmp_path: Path) -> None:
    async def main() -> None:
        wd = Watchdog()
        caller, io = _pair(wd)
        inbound = _inbound(_Mesh(), wd)
        async with trio.open_nursery() as n:
            n.start_soon(wd.run)
            await inbound(io, None, TCP_MAGIC + Preamble("db", "db-1", "").encode())
            n.cancel_scope.cancel()
        io.close()
        answer = AnswerReader().feed(await _read_all(caller))
        assert answer is not None and answer[0].code is Refusal.LOCAL_UNREACHABLE
        assert "db-1" in answer[0].phrase
        caller.close()
    trio.run(main, clock=REAL_IO)


# ---- upstream ports (tcp_proxy.TcpUpstreams) against fake inbounds -------------------


class _FakeInbounds:
    """Inbound listeners that read the magic and preamble, answer accepted and echo."""

    def __init__(self) -> None:
        self.preambles: dict[int, list[Preamble]] = {}

    async def serve(self, stream: trio.SocketStream) -> None:
        from rumor.proxy.tcp_preamble import Answer, PreambleReader
        port = stream.socket.getsockname()[1]
        data = b""
        while len(data) < len(TCP_MAGIC):
            data += await stream.receive_some()
        reader = PreambleReader()
        done = reader.feed(data[len(TCP_MAGIC):])
        while done is None:
            done = reader.feed(await stream.receive_some())
        self.preambles.setdefault(port, []).append(done[0])
        await stream.send_all(Answer(Refusal.ACCEPTED).encode() + done[1])
        while chunk := await stream.receive_some():
            await stream.send_all(chunk)
        await stream.send_eof()


class _EndpointsMesh:
    version = 0

    def __init__(self, endpoints: list[Endpoint]) -> None:
        self.eps = endpoints

    def endpoints(self, service: str) -> list[Endpoint]:
        return list(self.eps)

    def knows(self, service: str) -> bool:
        return True

    def local_instances(self, service: str) -> Iterator[LocalInstance]:
        return iter(())


def _dead_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port: int = s.getsockname()[1]
    s.close()  # nothing listens: connecting is refused
    return port


def test_upstream_connections_balance_skip_drained_and_retry_a_dead_instance() -> None:
    from rumor.proxy.tcp_proxy import TcpUpstreams
    from rumor.proxy.tcp_spec import Upstream

    async def main() -> None:
        fakes = _FakeInbounds()
        async with trio.open_nursery() as n:
            live = [(await n.start(partial(trio.serve_tcp, fakes.serve, 0,
                                           host="127.0.0.1")))[0].socket.getsockname()[1]
                    for _ in range(3)]
            dead = _dead_port()

            def ep(name: str, port: int, weight: int = 1,
                   carries: frozenset[str] = frozenset({"tcp"})) -> Endpoint:
                return Endpoint(f"{name}/db", name, "db", "", (), "127.0.0.1", port, None,
                                weight, "tcp", carries)
            mesh = _EndpointsMesh([ep("n0", live[0]), ep("n1", live[1]),
                                   ep("drained", live[2], weight=0), ep("dead", dead),
                                   ep("old", live[2], carries=frozenset()),
                                   Endpoint("http/db", "http", "db", "", (), "127.0.0.1",
                                            live[2], None)])
            ups = TcpUpstreams(mesh, lambda: NO_POLICY, identity="web")
            up = Upstream("db", "127.0.0.1", 0)
            ups.apply([up], ups.prepare([up]))
            await n.start(ups.run)
            port = next(iter(ups.ports().values()))
            for i in range(20):
                s = await trio.open_tcp_stream("127.0.0.1", port)
                msg = f"hello {i}".encode()
                await s.send_all(msg)
                await s.send_eof()
                got = b""
                while chunk := await s.receive_some():
                    got += chunk
                assert got == msg  # every connection made it, the dead instance retried
                await s.aclose()
            n.cancel_scope.cancel()
        by_port = {p: len(fakes.preambles.get(p, [])) for p in live}
        assert by_port[live[2]] == 0  # drained, not carrying tcp, or http: never sent
        assert by_port[live[0]] + by_port[live[1]] == 20
        assert all(p == Preamble("db", "db", "web") for ps in fakes.preambles.values()
                   for p in ps)
        failures = ups.metrics.connect_failures.values
        assert failures.get(("db", "refused"), 0) >= 1  # the dead one was tried, retried
        assert ups.metrics.connections.values == {("db", "relayed"): 20}
    trio.run(main)
