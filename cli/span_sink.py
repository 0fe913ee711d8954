"""A minimal OTLP/HTTP traces receiver on loopback, for the demo, the tests and the
benchmarks: it decodes each export with the official messages, keeps the spans (with
the ``service.name`` of their resource) and answers an empty success. Not a collector:
no storage, no query, no limits beyond ``keep``."""

from __future__ import annotations

import contextlib
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span

_OK = ExportTraceServiceResponse().SerializeToString()


class SpanSink:
    """Listens on 127.0.0.1 (``port``) until ``stop()``; ``spans`` holds the newest
    ``keep`` (service name, span); ``received`` counts every span, ``exports`` every
    request, ``content_types`` the media types they came as."""

    def __init__(self, keep: int = 100_000) -> None:
        self.keep = keep
        self.spans: list[tuple[str, Span]] = []
        self.received = self.exports = 0
        self.content_types: set[str] = set()
        self.lock = threading.Lock()
        self._open: set[socket.socket] = set()
        sink = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                with sink.lock:
                    sink._open.add(self.request)

            def do_POST(self) -> None:
                msg = ExportTraceServiceRequest()
                msg.ParseFromString(self.rfile.read(int(self.headers["content-length"])))
                sink._take(msg, self.headers.get("content-type", ""))
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(_OK)))
                self.end_headers()
                self.wfile.write(_OK)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = int(self.server.server_address[1])
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def _take(self, msg: ExportTraceServiceRequest, content_type: str) -> None:
        with self.lock:
            self.exports += 1
            self.content_types.add(content_type)
            for rs in msg.resource_spans:
                service = next((a.value.string_value for a in rs.resource.attributes
                                if a.key == "service.name"), "")
                for ss in rs.scope_spans:
                    self.received += len(ss.spans)
                    self.spans += [(service, s) for s in ss.spans]
            if len(self.spans) > self.keep:
                del self.spans[:len(self.spans) - self.keep]

    def of_trace(self, trace_id: bytes) -> list[tuple[str, Span]]:
        with self.lock:
            return [(svc, s) for svc, s in self.spans if s.trace_id == trace_id]

    def stop(self) -> None:
        """Down as a dead collector is: nothing listens, kept-alive connections cut."""
        self.server.shutdown()
        self.server.server_close()
        with self.lock:
            for sock in self._open:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
