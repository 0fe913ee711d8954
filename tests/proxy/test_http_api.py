"""The local HTTP server and API routes over a fake Node, plus CLI log and table output.

Each async test runs under `trio.run` with the server on an OS-chosen loopback port
and talks raw HTTP through an h11 client, so malformed and hostile bytes can be sent.
"""

from __future__ import annotations

import io
import json
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import h11
import pytest
import trio

from rumor.cli.client import ApiError, get_json, put_json
from rumor.cli.logs import configure_logging, log_event
from rumor.cli.table import render_table
from rumor.gossip.node import JoinError
from rumor.proxy.api.app import make_api
from rumor.proxy.api.router import Router
from rumor.proxy.api.server import Request, Response, ServerLimits, json_response, serve_http

MEMBERS = [
    {"name": "a", "addr": "127.0.0.1:7946", "status": "alive", "incarnation": 3,
     "tags": {"role": "web"}, "rtt_ms": 0.41, "since": 12.5},
    {"name": "b", "addr": "127.0.0.1:7948", "status": "failed", "incarnation": 1,
     "tags": {}, "rtt_ms": None, "since": 2.0},
]


class FakeNode:
    """Implements the slice of rumor.gossip.node.Node that the API uses."""

    name = "a"

    def __init__(self) -> None:
        self.degraded = False
        self.joined: list[list[str]] = []
        self.left = False

    def members(self) -> list[dict[str, Any]]:
        return [dict(m) for m in MEMBERS]

    def self_info(self) -> dict[str, Any]:
        return {**MEMBERS[0], "profile": "lan", "version": "0.1.0"}

    def health(self) -> dict[str, Any]:
        return {"status": "degraded" if self.degraded else "ok", "awareness": 0,
                "members": {"alive": 1, "suspect": 0, "failed": 1, "left": 0}}

    async def join(self, seeds: list[str]) -> int:
        await trio.sleep(0)
        self.joined.append(seeds)
        if any(seed.startswith("10.") for seed in seeds):
            raise JoinError("could not join: no seed answered")
        return len(seeds)

    async def leave(self) -> None:
        await trio.sleep(0)
        self.left = True


class RawClient:
    """One TCP connection speaking HTTP/1.1 through an h11 client state machine."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.conn = h11.Connection(h11.CLIENT)

    async def request(
        self, method: str, path: str, body: bytes = b"",
        headers: list[tuple[str, str]] | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        port = self.stream.socket.getpeername()[1]
        extra = headers or []
        all_headers = [("host", f"localhost:{port}"), ("content-length", str(len(body))),
                       *extra]
        if body and not any(k.lower() == "content-type" for k, _ in extra):
            all_headers.append(("content-type", "application/json"))
        if self.conn.our_state is h11.DONE:
            self.conn.start_next_cycle()
        data = self.conn.send(h11.Request(method=method, target=path, headers=all_headers))
        data += self.conn.send(h11.Data(data=body)) if body else b""
        data += self.conn.send(h11.EndOfMessage())
        await self.stream.send_all(data)
        return await self.response()

    async def response(self) -> tuple[int, dict[str, str], bytes]:
        status, headers, body = 0, {}, b""
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                self.conn.receive_data(await self.stream.receive_some(65536))
            elif isinstance(event, h11.Response):
                status = event.status_code
                headers = {k.decode(): v.decode() for k, v in event.headers}
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                return status, headers, body
            else:
                raise AssertionError(f"unexpected event {event!r}")


async def read_raw_response(stream: trio.SocketStream) -> tuple[int, bytes]:
    """Parse whatever the server sends back to bytes we wrote by hand."""
    conn = h11.Connection(h11.CLIENT)
    # Let the client state machine believe it sent a GET so it can parse the reply.
    conn.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
    conn.send(h11.EndOfMessage())
    client = RawClient(stream)
    client.conn = conn
    status, _, body = await client.response()
    return status, body


Scenario = Callable[[int, FakeNode, list[str]], Awaitable[None]]


def run_api(scenario: Scenario, limits: ServerLimits | None = None) -> list[str]:
    """Serve the API over a FakeNode, run `scenario(port, node, leaves)`, shut down."""
    node = FakeNode()
    leaves: list[str] = []

    async def main() -> None:
        # on_leaving records whether the node had already left (it must not have).
        api = make_api(node, on_leave=lambda: leaves.append("left"),
                       on_leaving=lambda: leaves.append(f"leaving (left={node.left})"))
        async with trio.open_nursery() as nursery:
            port = await nursery.start(lambda task_status: serve_http(
                api, "127.0.0.1", 0, limits=limits, task_status=task_status))
            with trio.fail_after(10):
                await scenario(port, node, leaves)
            nursery.cancel_scope.cancel()

    trio.run(main)
    return leaves


async def connect(port: int) -> RawClient:
    return RawClient(await trio.open_tcp_stream("127.0.0.1", port))


def test_members_self_and_health() -> None:
    async def scenario(port: int, node: FakeNode, leaves: list[str]) -> None:
        client = await connect(port)
        status, headers, body = await client.request("GET", "/v1/members")
        assert status == 200
        assert headers["content-type"] == "application/json"
        assert json.loads(body) == MEMBERS

        status, _, body = await client.request("GET", "/v1/members?status=failed")
        assert status == 200 and [m["name"] for m in json.loads(body)] == ["b"]

        status, _, body = await client.request("GET", "/v1/members?status=bogus")
        assert status == 400 and "bogus" in json.loads(body)["error"]

        status, _, body = await client.request("GET", "/v1/self")
        assert status == 200 and json.loads(body)["profile"] == "lan"

        status, _, body = await client.request("GET", "/v1/health")
        assert status == 200 and json.loads(body)["status"] == "ok"
        node.degraded = True
        status, _, body = await client.request("GET", "/v1/health")
        assert status == 503 and json.loads(body)["status"] == "degraded"

        status, headers, body = await client.request("HEAD", "/v1/members")
        assert status == 200 and body == b"" and int(headers["content-length"]) > 0

    run_api(scenario)


def test_join() -> None:
    async def scenario(port: int, node: FakeNode, leaves: list[str]) -> None:
        client = await connect(port)
        doc = json.dumps({"addrs": ["127.0.0.1:7946", "node2"]}).encode()
        status, _, body = await client.request("PUT", "/v1/join", doc)
        assert (status, json.loads(body)) == (200, {"joined": 2})
        assert node.joined == [["127.0.0.1:7946", "node2"]]

        status, _, body = await client.request("PUT", "/v1/join", b'{"addrs": ["10.9.9.9:1"]}')
        assert status == 502 and "no seed answered" in json.loads(body)["error"]

        for bad in (b"not json", b"{}", b'{"addrs": []}', b'{"addrs": [7]}',
                    b'{"addrs": ["h:99999"]}', b""):
            status, _, body = await client.request("PUT", "/v1/join", bad)
            assert status == 400, bad
            assert json.loads(body)["error"]
        assert len(node.joined) == 2

    run_api(scenario)


def test_leave_answers_before_on_leave_runs() -> None:
    async def scenario(port: int, node: FakeNode, leaves: list[str]) -> None:
        client = await connect(port)
        status, _, body = await client.request("PUT", "/v1/leave", b"{}")
        assert (status, json.loads(body)) == (200, {"left": True})
        assert node.left
        await trio.sleep(0.05)
        assert leaves == ["leaving (left=False)", "left"]

    # on_leaving (the agent's STOPPING=1) runs as the leave starts, on_leave after it.
    assert run_api(scenario) == ["leaving (left=False)", "left"]


def test_unknown_path_and_wrong_method() -> None:
    async def scenario(port: int, node: FakeNode, leaves: list[str]) -> None:
        client = await connect(port)
        status, _, body = await client.request("GET", "/v1/nope")
        assert status == 404 and "/v1/nope" in json.loads(body)["error"]

        status, headers, body = await client.request("DELETE", "/v1/members")
        assert status == 405 and headers["allow"] == "GET, HEAD"
        assert "DELETE" in json.loads(body)["error"]

        status, _, _ = await client.request("GET", "/v1/leave")
        assert status == 405
        assert not node.left

        status, _, _ = await client.request("GET", "/v1/members/")  # trailing slash
        assert status == 200

    run_api(scenario)


def test_keep_alive_serves_several_requests_on_one_connection() -> None:
    async def scenario(port: int, node: FakeNode, leaves: list[str]) -> None:
        client = await connect(port)
        for path in ("/v1/self", "/v1/members", "/v1/nope", "/v1/health"):
            status, headers, _ = await client.request("GET", path)
            assert status in (200, 404)
            assert headers.get("connection") != "close"

    run_api(scenario)


def test_malformed_request_gets_400_and_close() -> None:
    async def scenario(port: int, node: FakeNode, leaves: list[str]) -> None:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(b"GARBAGE\x00 / HTTP/9\r\n\r\n")
        status, body = await read_raw_response(stream)
        assert status == 400 and json.loads(body)["error"].startswith("bad request")
        assert await stream.receive_some(1024) == b""  # the server closed

    run_api(scenario)


def test_oversized_body_gets_413() -> None:
    limits = ServerLimits(max_body_bytes=1000)

    async def scenario(port: int, node: FakeNode, leaves: list[str]) -> None:
        # Declared up front: refused before the body is read.
        client = await connect(port)
        status, headers, body = await client.request("PUT", "/v1/join", b"x" * 5000)
        assert status == 413 and headers["connection"] == "close"
        assert "1000 bytes" in json.loads(body)["error"]

        # Chunked, so only counting the bytes can catch it.
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        chunk = b"x" * 600
        await stream.send_all(b"PUT /v1/join HTTP/1.1\r\nhost: x\r\n"
                              b"transfer-encoding: chunked\r\n\r\n"
                              + (b"258\r\n" + chunk + b"\r\n") * 2)
        status, _ = await read_raw_response(stream)
        assert status == 413

    run_api(scenario, limits)


def test_oversized_headers_are_refused() -> None:
    limits = ServerLimits(max_header_bytes=1024)

    async def scenario(port: int, node: FakeNode, leaves: list[str]) -> None:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(b"GET /v1/self HTTP/1.1\r\nhost: x\r\nx-big: "
                              + b"a" * 4096 + b"\r\n\r\n")
        status, _ = await read_raw_response(stream)
        assert status == 431

    run_api(scenario, limits)


def test_server_survives_hostile_connections() -> None:
    limits = ServerLimits(request_timeout=0.3)

    async def scenario(port: int, node: FakeNode, leaves: list[str]) -> None:
        # Connect and vanish; connect and send half a request; send half a request
        # and stall past the deadline (slowloris): all must leave the server healthy.
        (await trio.open_tcp_stream("127.0.0.1", port)).socket.close()
        half = await trio.open_tcp_stream("127.0.0.1", port)
        await half.send_all(b"PUT /v1/join HTTP/1.1\r\nhost: x\r\ncontent-length: 50\r\n\r\n{")
        await half.aclose()
        slow = await trio.open_tcp_stream("127.0.0.1", port)
        await slow.send_all(b"GET /v1/self HTTP/1.1\r\nho")
        status, _ = await read_raw_response(slow)
        assert status == 408
        idle = await trio.open_tcp_stream("127.0.0.1", port)
        with trio.fail_after(2):
            assert await idle.receive_some(1024) == b""  # idle connection closed quietly

        client = await connect(port)
        status, _, body = await client.request("GET", "/v1/members")
        assert status == 200 and json.loads(body) == MEMBERS

    run_api(scenario, limits)


def test_handler_exception_is_500_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    router = Router()

    async def boom(request: Request) -> Response:
        raise RuntimeError("kaboom")

    async def ok(request: Request) -> Response:
        return json_response({"params": request.params, "query": request.query})

    router.add("GET", "/boom", boom)
    router.add("GET", "/items/{name}", ok)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(serve_http, router)
            client = await connect(port)
            status, _, body = await client.request("GET", "/boom")
            assert status == 500 and "internal" in json.loads(body)["error"]
            status, _, body = await client.request("GET", "/items/web%20app?x=1&y=")
            assert status == 200
            assert json.loads(body) == {"params": {"name": "web app"},
                                        "query": {"x": "1", "y": ""}}
            nursery.cancel_scope.cancel()

    with caplog.at_level(logging.ERROR, logger="rumor.proxy.api.server"):
        trio.run(main)
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and errors[0].exc_info is not None
    assert "kaboom" in str(errors[0].exc_info[1])


def test_router_rejects_duplicate_routes() -> None:
    async def h(request: Request) -> Response:
        return Response()

    router = Router()
    router.add("GET", "/x", h)
    with pytest.raises(ValueError):
        router.add(["GET", "PUT"], "/x", h)


def test_sync_client_against_the_server() -> None:
    """The CLI client runs in a worker thread while trio serves the API."""

    async def scenario(port: int, node: FakeNode, leaves: list[str]) -> None:
        api = f"127.0.0.1:{port}"
        members = await trio.to_thread.run_sync(get_json, api, "/v1/members")
        assert members == MEMBERS
        joined = await trio.to_thread.run_sync(put_json, api, "/v1/join",
                                               {"addrs": ["127.0.0.1:1"]})
        assert joined == {"joined": 1}
        with pytest.raises(ApiError) as info:
            await trio.to_thread.run_sync(put_json, api, "/v1/join", {"addrs": ["10.0.0.1:1"]})
        assert info.value.status == 502
        assert "502 Bad Gateway: could not join: no seed answered" in str(info.value)

    run_api(scenario)


def test_client_reports_connection_refused() -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    with pytest.raises(ApiError) as info:
        get_json(f"127.0.0.1:{port}", "/v1/members", timeout=2)
    assert str(info.value) == (f"cannot reach agent API at 127.0.0.1:{port}: "
                               "connection refused — is `rumor agent` running?")
    assert info.value.status is None


# -- cli/logs ---------------------------------------------------------------------


@pytest.fixture
def restore_root_logger() -> Any:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.usefixtures("restore_root_logger")
def test_json_log_lines() -> None:
    out = io.StringIO()
    configure_logging("json", "debug", stream=out)
    log = logging.getLogger("rumor.test")
    event = {"event": "member", "member": "a", "status": "alive", "kind": "join",
             "incarnation": 3, "addr": "127.0.0.1:7946"}
    log_event(log, event)
    log.warning("plain %s", "message", extra={"peer": "b", "n": 2})
    try:
        raise ValueError("bad")
    except ValueError:
        log.exception("failed")

    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert len(lines) == 3
    first = lines[0]
    assert list(first)[:2] == ["ts", "level"]
    assert set(first) == {"ts", "level", *event}
    assert {k: first[k] for k in event} == event
    assert first["level"] == "info"
    assert first["ts"].endswith("Z") and first["ts"][10] == "T"
    assert lines[1] == {"ts": lines[1]["ts"], "level": "warning", "logger": "rumor.test",
                        "msg": "plain message", "peer": "b", "n": 2}
    assert lines[2]["level"] == "error" and "ValueError: bad" in lines[2]["exc"]


@pytest.mark.usefixtures("restore_root_logger")
def test_text_log_lines() -> None:
    out = io.StringIO()
    configure_logging("text", "info", stream=out)
    log = logging.getLogger("rumor.test")
    log_event(log, {"event": "member", "member": "a", "status": "suspect",
                    "incarnation": 3, "addr": "127.0.0.1:7946"})
    log_event(log, {"event": "policy", "name": "web", "version": 4})
    log.debug("hidden")
    text = out.getvalue().splitlines()
    assert len(text) == 2
    assert text[0].endswith("INFO    rumor.test: member a is suspect "
                            "(incarnation 3, 127.0.0.1:7946)")
    assert text[1].endswith("rumor.test: policy name=web version=4")


@pytest.mark.usefixtures("restore_root_logger")
def test_configure_logging_replaces_handlers_and_validates() -> None:
    out = io.StringIO()
    configure_logging("json", stream=io.StringIO())
    configure_logging("json", stream=out)
    logging.getLogger("rumor.test").info("once")
    assert len(out.getvalue().splitlines()) == 1
    with pytest.raises(ValueError):
        configure_logging("xml")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        configure_logging("json", "loud")


# -- cli/table --------------------------------------------------------------------


def test_table_alignment() -> None:
    table = render_table(MEMBERS, ["name", "addr", "status", "incarnation", "rtt_ms", "tags"])
    assert table.splitlines() == [
        "NAME  ADDR            STATUS  INCARNATION  RTT_MS  TAGS",
        "a     127.0.0.1:7946  alive             3    0.41  role=web",
        "b     127.0.0.1:7948  failed            1       -  -",
    ]


def test_table_defaults_and_edge_cases() -> None:
    assert render_table([]) == ""
    assert render_table([], ["name"]) == "NAME"
    rows: list[dict[str, Any]] = [{"a": "x\ny", "b": True}, {"c": [1, 2]}]
    assert render_table(rows, headers={"a": "Alpha"}).splitlines() == [
        "Alpha  B     C",
        "x y    true  -",
        "-      -     1,2",
    ]
