#!/usr/bin/env python3
"""The floor of the mandated stack: the least a trio + h11 + httpcore sidecar pair costs.

A proxy target for ../shared/anchors/proxy/bench.py, run beside ``proxy_pair.py`` (the
real rumor pair) so that the issue's figures can be read against what *any* sidecar
pair built on the issue's libraries (h11 on the server side, httpcore pooled
connections on the client side, trio) achieves on this machine. Two processes, as in
rumor: an "outbound" listening on ``BENCH_LISTEN`` forwards to an "inbound", which
forwards to the backends round-robin. Each does only the unavoidable work per request:
one h11 server cycle, one httpcore request on a pooled keep-alive connection, four
socket operations. No routing, balancing, policy, headers, metrics, logs, timeouts,
error handling or gossip: this is a measuring stick, not a proxy to use.

    python3 bench.py overhead --targets direct,haproxy,rumor,floor --host-header bench \\
        --proxy-cmd 'rumor=/venv/bin/python /rumor/bench/proxy_pair.py' \\
        --proxy-cmd 'floor=/venv/bin/python /rumor/bench/proxy_floor.py'

``FLOOR_CLIENT=h11`` replaces httpcore on the client side by a bare h11 client
connection (the cheapest conceivable client on this stack), to show how much of the
floor is httpcore's own bookkeeping.
"""

from __future__ import annotations

import itertools
import os
import signal
import socket
import subprocess
import sys

import h11
import httpcore
import trio

from rumor.proxy.net_backend import LeanTrioBackend  # httpcore's leanest trio backend

RECEIVE = 64 * 1024
Headers = list[tuple[bytes, bytes]]
_BACKEND = LeanTrioBackend()


class H11Client:
    """One keep-alive HTTP/1.1 client connection with bare h11 (no httpcore)."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.conn = h11.Connection(h11.CLIENT)

    async def request(self, method: bytes, target: bytes,
                      headers: Headers) -> tuple[int, Headers, bytes]:
        c = self.conn
        await self.stream.send_all(
            (c.send(h11.Request(method=method, target=target, headers=headers)) or b"")
            + (c.send(h11.EndOfMessage()) or b""))
        status: int = 0
        hs: Headers = []
        body = b""
        while True:
            ev = c.next_event()
            if ev is h11.NEED_DATA:
                c.receive_data(await self.stream.receive_some(RECEIVE))
            elif isinstance(ev, h11.Response):
                status, hs = ev.status_code, list(ev.headers)
            elif isinstance(ev, h11.Data):
                body += ev.data
            elif isinstance(ev, h11.EndOfMessage):
                c.start_next_cycle()
                return status, hs, body
            else:
                raise ConnectionError(f"upstream: {ev!r}")


async def hop(listen_port: int, upstreams: list[tuple[str, int]], client: str) -> None:
    """Serve ``listen_port``; forward each request to the next upstream in turn."""
    rr = itertools.cycle(upstreams)
    idle: dict[tuple[str, int], list[object]] = {u: [] for u in upstreams}

    async def forward(req: h11.Request) -> tuple[int, Headers, bytes]:
        up = next(rr)
        pool = idle[up]
        if client == "h11":
            hc = pool.pop() if pool else H11Client(await trio.open_tcp_stream(*up))
            assert isinstance(hc, H11Client)
            out = await hc.request(req.method, req.target, list(req.headers))
            pool.append(hc)
            return out
        if pool:
            conn = pool.pop()
        else:
            conn = httpcore.AsyncHTTP11Connection(
                httpcore.Origin(b"http", up[0].encode(), up[1]),
                stream=await _BACKEND.connect_tcp(*up))
        assert isinstance(conn, httpcore.AsyncHTTP11Connection)
        url = httpcore.URL(scheme=b"http", host=up[0].encode(), port=up[1], target=req.target)
        resp = await conn.handle_async_request(
            httpcore.Request(req.method, url, headers=list(req.headers)))
        body = b"".join([c async for c in resp.aiter_stream()])
        await resp.aclose()
        pool.append(conn)
        return resp.status, list(resp.headers), body

    async def serve(stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                ev = conn.next_event()
                while ev is h11.NEED_DATA:
                    conn.receive_data(await stream.receive_some(RECEIVE))
                    ev = conn.next_event()
                if not isinstance(ev, h11.Request):
                    return
                while not isinstance(conn.next_event(), h11.EndOfMessage):
                    pass  # the harness sends no request bodies
                status, hs, body = await forward(ev)
                hs = [(k, v) for k, v in hs if k.lower() != b"content-length"]
                hs.append((b"content-length", str(len(body)).encode()))
                await stream.send_all(
                    (conn.send(h11.Response(status_code=status, headers=hs)) or b"")
                    + (conn.send(h11.Data(data=body)) or b"")
                    + (conn.send(h11.EndOfMessage()) or b""))
                conn.start_next_cycle()
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError,
                httpcore.NetworkError, httpcore.ProtocolError, OSError):
            return

    await trio.serve_tcp(serve, listen_port, host="127.0.0.1")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> int:
    client = os.environ.get("FLOOR_CLIENT", "httpcore")
    if len(sys.argv) == 4 and sys.argv[1] == "--hop":  # one process of the pair
        port = int(sys.argv[2])
        ups = [(h, int(p)) for h, p in (a.rsplit(":", 1) for a in sys.argv[3].split(","))]
        trio.run(hop, port, ups, client)
        return 0
    listen = int(os.environ["BENCH_LISTEN"].rsplit(":", 1)[1])
    inbound = _free_port()
    me = [sys.executable, os.path.abspath(__file__), "--hop"]
    procs = [subprocess.Popen([*me, str(inbound), os.environ["BENCH_BACKENDS"]]),
             subprocess.Popen([*me, str(listen), f"127.0.0.1:{inbound}"])]

    def stop(signum: int, frame: object) -> None:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait()
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for p in procs:
        p.wait()
    return 1


if __name__ == "__main__":
    sys.exit(main())
