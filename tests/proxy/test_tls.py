"""Mutual TLS's trio shell on a virtual clock: a renewed certificate is picked up by
the reloader at its interval (a broken renewal keeps the old one), and a handshake
yields the peer's identity or fails in bounded time."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import trio
import trio.testing

from rumor.proxy.ca import issue
from rumor.proxy.sockio import TlsSocketIO, Watchdog
from rumor.proxy.tls import HANDSHAKE_TIMEOUT, HandshakeFailed, MeshTls

from .tls_files import tls_files


def test_the_reloader_picks_up_a_renewal_at_its_interval_and_survives_a_bad_one(
        tmp_path: Path) -> None:
    async def main() -> None:
        files = tls_files(tmp_path, "a", ["web"])
        tls = MeshTls(files)
        async with trio.open_nursery() as n:
            n.start_soon(tls.run_reloader, 5.0)
            issue(tmp_path / "ca", "a", ["web", "api"], 30, tmp_path / "a")  # renewal
            await trio.sleep(4.9)
            assert tls.identity.services == frozenset({"web"})
            await trio.sleep(0.2)
            assert tls.identity.services == frozenset({"web", "api"})
            files.key.write_text("not a key\n")  # a copy caught halfway
            await trio.sleep(5.0)
            assert tls.stats["reload_failures"] == 1
            assert tls.identity.services == frozenset({"web", "api"})  # still the old
            n.cancel_scope.cancel()
        assert tls.stats["reloads"] == 1
    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_a_handshake_gives_each_side_the_others_identity(tmp_path: Path) -> None:
    async def main() -> None:
        server = MeshTls(tls_files(tmp_path, "a", ["web"]))
        client = MeshTls(tls_files(tmp_path, "b", ["api"]))
        s, c = socket.socketpair()
        got = {}
        wd = Watchdog()

        async def accept() -> None:
            io, got["server saw"] = await server.accept(s, wd)
            io.close()

        async def connect() -> None:
            io = TlsSocketIO(c, wd, client.client, server_side=False)
            got["client saw"] = await client.handshake(io)
            io.close()
        async with trio.open_nursery() as n:
            n.start_soon(accept)
            n.start_soon(connect)
        assert got["server saw"].node == "b" and got["server saw"].services == {"api"}
        assert got["client saw"].node == "a" and got["client saw"].services == {"web"}
        assert server.stats["handshakes"] == client.stats["handshakes"] == 1
    # Real socket I/O: jump the virtual clock only after a real pause.
    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0.5))


def test_a_silent_client_fails_the_handshake_at_the_timeout(tmp_path: Path) -> None:
    async def main() -> None:
        server = MeshTls(tls_files(tmp_path, "a", ["web"]))
        s, _c = socket.socketpair()
        wd = Watchdog()
        async with trio.open_nursery() as n:
            n.start_soon(wd.run)
            t0 = trio.current_time()
            with pytest.raises(HandshakeFailed, match="no TLS handshake within"):
                await server.accept(s, wd)
            assert trio.current_time() - t0 == pytest.approx(HANDSHAKE_TIMEOUT, abs=0.01)
            assert server.stats["handshake_failures"] == 1
            n.cancel_scope.cancel()
    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0.1))
