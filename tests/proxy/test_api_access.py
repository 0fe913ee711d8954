"""The local API against a browser and a stranger: Host, Origin, methods, content types
and the write token (proxy/api/access.py), as rules and on a live server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio

from rumor.proxy.api.access import ApiAccess, split_host
from rumor.proxy.api.app import make_api
from rumor.proxy.api.server import Request, serve_http

from .test_http_api import FakeNode

LOCAL = ("127.0.0.1", 7947)


def req(method: str = "GET", host: str = "127.0.0.1:7947", body: bytes = b"",
        **headers: str) -> Request:
    h = {"host": host, **{k.replace("_", "-"): v for k, v in headers.items()}}
    return Request(method=method, path="/v1/x", headers=h, body=body, local=LOCAL)


def status(access: ApiAccess, r: Request) -> int | None:
    refused = access.refusal(r)
    return None if refused is None else refused.status


@pytest.mark.parametrize("host", ["127.0.0.1:7947", "localhost:7947", "LOCALHOST:7947",
                                  "127.9.9.9:7947", "[::1]:7947", "api.internal:7947"])
def test_hosts_naming_this_api_pass(host: str) -> None:
    assert status(ApiAccess(allowed_hosts=frozenset({"api.internal"})), req(host=host)) is None


@pytest.mark.parametrize("host", ["evil.example:7947", "127.0.0.1:80", "127.0.0.1",
                                  "localhost:7948", "", "127.0.0.1:7947:1", "[::1",
                                  "10.0.0.1:7947", "a" * 5000, "localhost:07947x",
                                  "api.internal:7947"])
def test_other_hosts_are_refused_as_dns_rebinding(host: str) -> None:
    refused = ApiAccess().refusal(req(host=host))
    assert refused is not None and refused.status == 403
    assert len(refused.body) < 400  # the hostile value is described, not echoed whole


def test_the_address_the_connection_arrived_on_is_this_api() -> None:
    r = Request(method="GET", path="/", headers={"host": "10.1.2.3:7947"},
                local=("10.1.2.3", 7947))
    assert ApiAccess().refusal(r) is None


def test_split_host() -> None:
    assert split_host("[::1]:7947") == ("::1", 7947)
    assert split_host("Example.COM") == ("example.com", 80)
    assert split_host("x:") == ("x", 80)
    for bad in ("", ":80", "[::1]x", "x:y", "x:123456", "[]:1"):
        assert split_host(bad) == (None, None), bad


@pytest.mark.parametrize("origin", ["http://evil.example", "null", "http://127.0.0.1:8080",
                                    "https://127.0.0.1:7947", "http://localhost:7947/x",
                                    "file://"])
def test_a_foreign_origin_is_refused_on_every_method(origin: str) -> None:
    for method in ("GET", "PUT", "DELETE"):
        assert status(ApiAccess(), req(method, origin=origin)) == 403


def test_the_apis_own_origin_and_same_origin_fetches_pass() -> None:
    assert status(ApiAccess(), req(origin="http://127.0.0.1:7947")) is None
    assert status(ApiAccess(), req(origin="http://localhost:7947")) is None
    assert status(ApiAccess(), req(sec_fetch_site="same-origin")) is None
    assert status(ApiAccess(), req(sec_fetch_site="none")) is None
    assert status(ApiAccess(), req(sec_fetch_site="cross-site")) == 403


def test_preflights_are_refused_without_cors_headers() -> None:
    refused = ApiAccess().refusal(req("OPTIONS", origin="http://127.0.0.1:7947",
                                      access_control_request_method="PUT"))
    assert refused is not None and refused.status == 403
    assert not any(k.lower().startswith("access-control") for k, _ in refused.headers)


@pytest.mark.parametrize("ctype", ["text/plain", "application/x-www-form-urlencoded",
                                   "multipart/form-data; boundary=x", "", "application/jsonx"])
def test_a_body_must_be_json_or_an_envelope(ctype: str) -> None:
    assert status(ApiAccess(), req("PUT", body=b"{}", content_type=ctype)) == 415
    for ok in ("application/json", "application/json; charset=utf-8", "Application/JSON",
               "application/x-rumor-envelope"):
        assert status(ApiAccess(), req("PUT", body=b"{}", content_type=ok)) is None


def test_the_token_guards_writes_only() -> None:
    access = ApiAccess(token="s3cret-token")
    assert status(access, req("GET")) is None
    missing = access.refusal(req("PUT"))
    assert missing is not None and missing.status == 401
    assert ("www-authenticate", 'Bearer realm="rumor"') in missing.headers
    assert status(access, req("PUT", authorization="Bearer wrong")) == 403
    assert status(access, req("DELETE", x_rumor_token="s3cret-tokenX")) == 403
    assert status(access, req("PUT", authorization="Bearer s3cret-token")) is None
    assert status(access, req("PUT", authorization="bearer  s3cret-token ")) is None
    assert status(access, req("DELETE", x_rumor_token="s3cret-token")) is None


# ---- on a live server -----------------------------------------------------------------------


async def _raw(port: int, data: bytes) -> tuple[int, bytes]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(data)
        out = b""
        while b"\r\n\r\n" not in out or len(out) < out.find(b"\r\n\r\n") + 4 + int(
                _header(out, b"content-length") or 0):
            chunk = await stream.receive_some(65536)
            if not chunk:
                break
            out += chunk
    head, _, body = out.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), head + b"\r\n\r\n" + body


def _header(data: bytes, name: bytes) -> bytes | None:
    for line in data.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]:
        k, _, v = line.partition(b":")
        if k.strip().lower() == name:
            return v.strip()
    return None


def _serve(access: ApiAccess, scenario: object) -> FakeNode:
    node = FakeNode()
    leaves: list[str] = []

    async def main() -> None:
        api = make_api(node, on_leave=lambda: leaves.append("left"), access=access)
        async with trio.open_nursery() as nursery:
            port = await nursery.start(serve_http, api, "127.0.0.1", 0)
            with trio.fail_after(10):
                await scenario(port)  # type: ignore[operator]
            nursery.cancel_scope.cancel()

    trio.run(main)
    assert leaves == []
    return node


def test_what_a_cross_origin_page_can_send_changes_nothing() -> None:
    """The three requests that took the gossip key before: text/plain POSTs, which a
    browser sends cross-origin without asking; and a rebound GET of the keyring."""

    async def scenario(port: int) -> None:
        h = f"127.0.0.1:{port}".encode()
        for path in (b"/v1/join", b"/v1/leave", b"/v1/keyring/install"):
            body = b'{"addrs": ["127.0.0.1:1"], "key": "x"}'
            code, out = await _raw(port, b"POST " + path + b" HTTP/1.1\r\nhost: " + h +
                                   b"\r\norigin: http://evil.example\r\ncontent-type: "
                                   b"text/plain\r\ncontent-length: " +
                                   str(len(body)).encode() + b"\r\n\r\n" + body)
            assert code == 403 and b"access-control" not in out.lower()
            # Even without an Origin (an old browser, a form): no POST route, no text body.
            code, _ = await _raw(port, b"POST " + path + b" HTTP/1.1\r\nhost: " + h +
                                 b"\r\ncontent-type: text/plain\r\ncontent-length: " +
                                 str(len(body)).encode() + b"\r\n\r\n" + body)
            assert code == 415
            code, _ = await _raw(port, b"POST " + path + b" HTTP/1.1\r\nhost: " + h +
                                 b"\r\ncontent-type: application/json\r\ncontent-length: " +
                                 str(len(body)).encode() + b"\r\n\r\n" + body)
            assert code == 405
        code, out = await _raw(port, b"OPTIONS /v1/join HTTP/1.1\r\nhost: " + h +
                               b"\r\norigin: http://evil.example\r\n"
                               b"access-control-request-method: PUT\r\n\r\n")
        assert code == 403 and b"access-control" not in out.lower()
        code, out = await _raw(port, b"GET /v1/members HTTP/1.1\r\nhost: evil.example:" +
                               str(port).encode() + b"\r\n\r\n")
        assert code == 403 and b"127.0.0.1:7946" not in out

    node = _serve(ApiAccess(), scenario)
    assert node.joined == [] and not node.left


def test_with_a_token_a_local_process_cannot_change_the_agent() -> None:
    async def scenario(port: int) -> None:
        h = f"127.0.0.1:{port}".encode()
        put = (b"PUT /v1/join HTTP/1.1\r\nhost: " + h + b"\r\ncontent-type: application/json"
               b"\r\ncontent-length: 30\r\n")
        body = b'{"addrs": ["127.0.0.1:7946"]}\n'
        code, out = await _raw(port, put + b"\r\n" + body)
        assert code == 401 and json.loads(out.split(b"\r\n\r\n", 1)[1])["error"]
        code, _ = await _raw(port, put + b"authorization: Bearer nope\r\n\r\n" + body)
        assert code == 403
        code, _ = await _raw(port, b"GET /v1/members HTTP/1.1\r\nhost: " + h + b"\r\n\r\n")
        assert code == 200  # reads need no token
        code, _ = await _raw(port, put + b"authorization: Bearer tok-123\r\n\r\n" + body)
        assert code == 200

    node = _serve(ApiAccess(token="tok-123"), scenario)
    assert node.joined == [["127.0.0.1:7946"]]


def test_nested_json_is_a_400_not_a_traceback(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario(port: int) -> None:
        body = b"[" * 200_000
        code, out = await _raw(port, b"PUT /v1/join HTTP/1.1\r\nhost: 127.0.0.1:" +
                               str(port).encode() + b"\r\ncontent-type: application/json\r\n"
                               b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" +
                               body)
        assert code == 400 and b"nested too deeply" in out

    _serve(ApiAccess(), scenario)
    assert not [r for r in caplog.records if r.levelname == "ERROR"]


def test_the_agent_warns_when_its_gossip_api_or_secrets_are_exposed(tmp_path: Path) -> None:
    from rumor.cli.agent import AgentOptions, exposure_warnings
    from rumor.gossip.config import LAN
    from rumor.gossip.keyring_file import generate_key, load_keyring

    ring = tmp_path / "ring"
    ring.write_text(generate_key() + "\n")
    ring.chmod(0o644)
    quiet = AgentOptions(name="a", bind=("127.0.0.1", 7946), api=("127.0.0.1", 7947),
                         gossip=LAN, profile="lan")
    assert exposure_warnings(quiet) == []
    loud = AgentOptions(name="a", bind=("0.0.0.0", 7946), api=("0.0.0.0", 7947),
                        gossip=LAN, profile="lan")
    text = " ".join(exposure_warnings(loud))
    assert "not encrypted" in text and "without a token" in text
    keyed = AgentOptions(name="a", bind=("10.0.0.1", 7946), api=("127.0.0.1", 7947),
                         gossip=LAN, profile="lan", keyring=load_keyring(ring),
                         keyring_file=str(ring))
    assert ["readable by other users" in w for w in exposure_warnings(keyed)] == [True]
    ring.chmod(0o600)
    assert exposure_warnings(keyed) == []
