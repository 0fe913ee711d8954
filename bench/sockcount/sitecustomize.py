"""Counts the bytes a process sends on its sockets, for ``bench/signed_agents.py``.

On ``PYTHONPATH`` with ``RUMOR_BENCH_SOCKCOUNT=DIR``, every send through a
``socket.socket`` (trio's sockets wrap them) is added to a counter: ``udp`` for
datagrams (``sendto``), ``api`` for streams whose local port is the agent's ``--api``
port, ``tcp`` for the other streams (push-pull, TCP pings); a daemon thread writes
them to ``DIR/PID.json`` every 5 s. Payload bytes, not IP packet lengths.
"""

import contextlib
import json
import os
import socket
import sys
import threading
import time

_dir = os.environ.get("RUMOR_BENCH_SOCKCOUNT")
if _dir:
    _api = -1
    if "--api" in sys.argv:
        with contextlib.suppress(IndexError, ValueError):
            _api = int(sys.argv[sys.argv.index("--api") + 1].rsplit(":", 1)[1])
    counts = {"udp": 0, "tcp": 0, "api": 0}
    _kind: dict[int, str] = {}

    def _stream_kind(sock: socket.socket) -> str:
        k = _kind.get(id(sock))
        if k is None:
            try:
                k = "api" if sock.getsockname()[1] == _api else "tcp"
            except OSError:
                k = "tcp"
            if len(_kind) > 4096:
                _kind.clear()
            _kind[id(sock)] = k
        return k

    _send, _sendall, _sendto = socket.socket.send, socket.socket.sendall, socket.socket.sendto

    def send(self, data, *a):  # type: ignore[no-untyped-def]
        n = _send(self, data, *a)
        counts[_stream_kind(self)] += n
        return n

    def sendall(self, data, *a):  # type: ignore[no-untyped-def]
        _sendall(self, data, *a)
        counts[_stream_kind(self)] += len(data)

    def sendto(self, data, *a):  # type: ignore[no-untyped-def]
        n = _sendto(self, data, *a)
        counts["udp"] += n
        return n

    socket.socket.send = send  # type: ignore[method-assign]
    socket.socket.sendall = sendall  # type: ignore[method-assign]
    socket.socket.sendto = sendto  # type: ignore[method-assign]

    def _writer() -> None:
        path = os.path.join(_dir, f"{os.getpid()}.json")
        while True:
            time.sleep(5)
            tmp = path + ".tmp"
            with open(tmp, "w") as f:
                json.dump({**counts, "t": time.time()}, f)
            os.replace(tmp, path)

    threading.Thread(target=_writer, daemon=True).start()
