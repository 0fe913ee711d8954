"""Tiny HTTP/1.1 backends for proxy tests, steerable while they run.

Each answers every request with its name in ``x-backend`` and, as the test sets it,
a status, a delay, or the length of the body it received (read in chunks, so a huge
upload costs it no memory). Keep-alive, threaded, loopback only.
"""

from __future__ import annotations

import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class Backend:
    def __init__(self, name: str) -> None:
        self.name = name
        self.status = 200
        self.delay = 0.0
        self.hits = 0
        self.last_headers: dict[str, str] = {}
        self._lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                # Headers and body are two writes: without this, Nagle and the
                # proxy's delayed ACK add 40 ms to every response.
                self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def _serve(self) -> None:
                with outer._lock:
                    outer.hits += 1
                    outer.last_headers = {k.lower(): v for k, v in self.headers.items()}
                received = self._drain()
                if outer.delay:
                    time.sleep(outer.delay)
                body = f"{outer.name} {self.command} {self.path} {received}\n".encode()
                self.send_response(outer.status)
                self.send_header("x-backend", outer.name)
                self.send_header("x-received", str(received))
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _drain(self) -> int:
                n = 0
                if self.headers.get("transfer-encoding", "").lower() == "chunked":
                    while True:
                        size = int(self.rfile.readline().split(b";")[0], 16)
                        if size == 0:
                            self.rfile.readline()
                            return n
                        while size:
                            got = len(self.rfile.read(min(size, 1 << 20)))
                            n += got
                            size -= got
                        self.rfile.readline()
                left = int(self.headers.get("content-length") or 0)
                while left:
                    got = len(self.rfile.read(min(left, 1 << 20)))
                    if not got:
                        break
                    n += got
                    left -= got
                return n

            do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _serve

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = int(self.server.server_address[1])
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def reset(self) -> None:
        self.status, self.delay, self.hits = 200, 0.0, 0

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
