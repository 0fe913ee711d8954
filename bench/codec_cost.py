"""What parsing costs per message: the data path's codec (llhttp, strict, plus the
checks h11 makes) against h11, the parser the listeners use today.

    .venv/bin/python bench/codec_cost.py --rounds 5

Each round parses N request heads with 8 headers (and a 3-byte body), N response
heads with 6 headers and a 2-byte body, and N pipelined pairs of small requests, with
each parser; prints µs per message, median and range over rounds, as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import h11

from rumor.proxy.codec import RequestReader, ResponseReader

REQUEST = (b"POST /api/v1/items?page=2 HTTP/1.1\r\nHost: web\r\nUser-Agent: bench/1.0\r\n"
           b"Accept: application/json\r\nAccept-Encoding: gzip\r\nContent-Type: text/plain\r\n"
           b"Traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\n"
           b"X-Request-Id: 7f3c\r\nContent-Length: 3\r\n\r\nabc")
RESPONSE = (b"HTTP/1.1 200 OK\r\nServer: x\r\nDate: Wed, 02 Dec 2026 10:00:00 GMT\r\n"
            b"Content-Type: text/plain\r\nCache-Control: no-store\r\nX-Backend: b1\r\n"
            b"Content-Length: 2\r\n\r\nhi")
PIPELINE = (b"GET /a HTTP/1.1\r\nHost: web\r\n\r\nGET /b HTTP/1.1\r\nHost: web\r\n\r\n")


def codec_request() -> None:
    RequestReader().feed(REQUEST)


def h11_request() -> None:
    c = h11.Connection(h11.SERVER)
    c.receive_data(REQUEST)
    while c.next_event() is not h11.NEED_DATA and c.their_state is not h11.DONE:
        pass


def codec_response() -> None:
    r = ResponseReader()
    r.expect(b"GET")
    r.feed(RESPONSE)


def h11_response() -> None:
    c = h11.Connection(h11.CLIENT)
    c.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
    c.send(h11.EndOfMessage())
    c.receive_data(RESPONSE)
    while c.their_state is not h11.DONE:
        c.next_event()


def codec_pipeline() -> None:
    RequestReader().feed(PIPELINE)


def h11_pipeline() -> None:
    c = h11.Connection(h11.SERVER)
    c.receive_data(PIPELINE)
    for _ in range(2):
        while not isinstance(c.next_event(), h11.EndOfMessage):
            pass
        c.send(h11.Response(status_code=200, headers=[("content-length", "0")]))
        c.send(h11.EndOfMessage())
        c.start_next_cycle()


CASES: dict[str, tuple[Callable[[], None], int]] = {
    "request_head/codec": (codec_request, 1), "request_head/h11": (h11_request, 1),
    "response_head/codec": (codec_response, 1), "response_head/h11": (h11_response, 1),
    "pipelined_pair/codec": (codec_pipeline, 2), "pipelined_pair/h11": (h11_pipeline, 2),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("-n", type=int, default=20000)
    args = ap.parse_args()
    results: dict[str, list[float]] = {k: [] for k in CASES}
    for _ in range(args.rounds):
        for name, (fn, per) in CASES.items():  # alternate the parsers within a round
            fn()
            t0 = time.perf_counter()
            for _ in range(args.n):
                fn()
            results[name].append((time.perf_counter() - t0) / (args.n * per) * 1e6)
    print(json.dumps({k: {"median_us": round(statistics.median(v), 2),
                          "min_us": round(min(v), 2), "max_us": round(max(v), 2)}
                      for k, v in results.items()}, indent=1))


if __name__ == "__main__":
    main()
