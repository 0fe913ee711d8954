#!/usr/bin/env python3
"""CPU cost per request of the libraries on the sidecar's path, in process, no sockets.

The floor under any sidecar built on h11 (server side), httpcore (client side) and
trio: what one h11 server cycle, one h11 client cycle and one httpcore request on a
reused connection cost in CPython on this machine, and what a trio socket operation
costs next to a raw one. A sidecar pair does two of each per proxied request.

    python bench/proxy_libcost.py [--n 20000]
"""

from __future__ import annotations

import argparse
import socket
import time
import typing

import h11
import httpcore
import trio

REQUEST = b"GET / HTTP/1.1\r\nHost: bench\r\nUser-Agent: wrk\r\n\r\n"
RESPONSE = (b"HTTP/1.1 200 OK\r\nServer: bench-backend\r\nX-Backend: b1\r\n"
            b"Content-Length: 16\r\n\r\nhello from b1 ok")


def h11_server(n: int) -> float:
    conn = h11.Connection(h11.SERVER)
    t = time.perf_counter()
    for _ in range(n):
        conn.receive_data(REQUEST)
        assert isinstance(conn.next_event(), h11.Request)
        assert isinstance(conn.next_event(), h11.EndOfMessage)
        conn.send(h11.Response(status_code=200, headers=[(b"content-length", b"16"),
                                                         (b"x-backend", b"b1")]))
        conn.send(h11.Data(data=b"hello from b1 ok"))
        conn.send(h11.EndOfMessage())
        conn.start_next_cycle()
    return (time.perf_counter() - t) / n


def h11_client(n: int) -> float:
    conn = h11.Connection(h11.CLIENT)
    t = time.perf_counter()
    for _ in range(n):
        conn.send(h11.Request(method=b"GET", target=b"/",
                              headers=[(b"host", b"bench"), (b"user-agent", b"wrk")]))
        conn.send(h11.EndOfMessage())
        conn.receive_data(RESPONSE)
        while not isinstance(conn.next_event(), h11.EndOfMessage):
            pass
        conn.start_next_cycle()
    return (time.perf_counter() - t) / n


class _Canned(httpcore.AsyncNetworkStream):
    """Answers every request with RESPONSE at once."""

    def __init__(self) -> None:
        self.pending = b""

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        data, self.pending = self.pending, b""
        return data

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self.pending = RESPONSE

    async def aclose(self) -> None:
        pass

    def get_extra_info(self, info: str) -> typing.Any:
        return None


async def httpcore_request(n: int) -> float:
    conn = httpcore.AsyncHTTP11Connection(httpcore.Origin(b"http", b"x", 80), _Canned())
    t = time.perf_counter()
    for _ in range(n):
        r = await conn.handle_async_request(
            httpcore.Request(b"GET", "http://x/", headers=[(b"host", b"bench")]))
        async for _chunk in r.stream:  # type: ignore[union-attr]
            pass
        await r.aclose()
    return (time.perf_counter() - t) / n


async def trio_socket_op(n: int) -> float:
    a, b = trio.socket.socketpair()
    t = time.perf_counter()
    for _ in range(n):
        await a.send(b"x" * 100)
        await b.recv(1000)
    return (time.perf_counter() - t) / n / 2


def raw_socket_op(n: int) -> float:
    a, b = socket.socketpair()
    t = time.perf_counter()
    for _ in range(n):
        a.send(b"x" * 100)
        b.recv(1000)
    return (time.perf_counter() - t) / n / 2


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=20000)
    n = p.parse_args().n
    rows = [("h11 server cycle (parse request, write response)", h11_server(n)),
            ("h11 client cycle (write request, parse response)", h11_client(n)),
            ("httpcore request on a reused connection", trio.run(httpcore_request, n)),
            ("trio socket operation", trio.run(trio_socket_op, n)),
            ("raw socket operation", raw_socket_op(n))]
    for what, seconds in rows:
        print(f"{seconds * 1e6:8.1f} µs  {what}")
    pair = 2 * (rows[0][1] + rows[2][1] + 4 * rows[3][1])
    print(f"{pair * 1e6:8.1f} µs  per request through a sidecar pair (2 × (server + "
          f"httpcore + 4 socket operations)): at most {1 / pair:,.0f} req/s per core")


if __name__ == "__main__":
    main()
