"""The web UI's routes (proxy/api/ui.py) through the real router and access guard, its
state document and change index (proxy/api/ui_state.py), and the rules its static files
keep (nothing inline, no markup built from strings). No sockets: requests are handed
to the API's handler; the blocking read runs on trio's MockClock."""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from rumor.gossip.catalog import CheckSummary, Instance
from rumor.proxy.api.access import ApiAccess
from rumor.proxy.api.app import make_api
from rumor.proxy.api.server import HttpError, Request, Response
from rumor.proxy.api.ui import CSP, FILES, load_files
from rumor.proxy.api.ui_state import state_index, ui_state

from .test_http_api import FakeNode

UI = Path(__file__).resolve().parents[2] / "proxy" / "ui"
LOCAL = ("127.0.0.1", 7947)
HOSTILE = '<img src=x onerror="window.__pwned=1"><script>window.__pwned=2</script>'


class FakeCatalog:
    """The slice of Discovery the state reads: one service, a local and a remote instance."""

    def __init__(self) -> None:
        self.status = "passing"
        self.rtt = 0.001

    def _instances(self) -> list[Instance]:
        return [
            Instance("web-1", "web", "a", "127.0.0.1", 8080, ("blue",), "v1", 1, "passing",
                     (CheckSummary("web-1:http", "http", "passing"),), 0.0),
            Instance("web-2", "web", "b", "127.0.0.2", 8080, (), "v2", 1, self.status,
                     (CheckSummary("web-2:http", "http", self.status),), self.rtt),
        ]

    def services(self) -> dict[str, dict[str, Any]]:
        ins = self._instances()
        return {"web": {"tags": ["blue"], "versions": ["v1", "v2"], "instances": len(ins),
                        **{s: sum(i.status == s for i in ins)
                           for s in ("passing", "warning", "critical")}}}

    def instances(self, name: str, *, tag: str | None = None, version: str | None = None,
                  passing: bool = False, include_critical: bool = False,
                  near: bool = False) -> list[Instance]:
        assert include_critical  # the UI shows failing instances too
        return [i for i in self._instances() if i.service == name]

    def local_services(self) -> list[dict[str, Any]]:
        return [{"id": "web-1", "name": "web",
                 "checks": [{"id": "web-1:http", "status": "passing", "output": HOSTILE}]}]

    # The rest of CatalogApi, unused by the UI.
    def index(self, name: str | None = None) -> int:
        return 1

    async def wait(self, index: int, timeout: float, name: str | None = None) -> int:
        return 1

    def register(self, reg: Any) -> list[str]:
        raise NotImplementedError

    def deregister(self, service_id: str) -> bool:
        raise NotImplementedError

    def heartbeat(self, check_id: str, status: str = "passing", output: str = "") -> None:
        raise NotImplementedError


class FakePolicies:
    evaluator: Any = None

    def __init__(self) -> None:
        self.rejections: list[dict[str, Any]] = []

    def held(self) -> list[Any]:
        return []

    def get(self, name: str) -> Any:
        return None

    def status(self) -> dict[str, Any]:
        return {"trust": {"version": 0, "threshold": 1, "keys": ["k1"]},
                "stats": {"rejected": {}}, "conflicts": [], "rejections": self.rejections}

    def publish(self, data: bytes, origin: str = "api") -> Any:
        raise NotImplementedError

    def refuse(self, reason: str, detail: str, data: bytes = b"", origin: str = "api") -> Any:
        raise NotImplementedError


class MovingNode(FakeNode):
    """Members whose RTT and age change on every read, as a real node's do."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0
        self.b_status = "alive"

    def members(self) -> list[dict[str, Any]]:
        self.reads += 1
        rows = super().members()
        rows[0]["rtt_ms"] = 0.4 + self.reads / 1000
        rows[0]["since"] = 12.5 + self.reads
        rows[1]["status"] = self.b_status
        return rows


def get(path: str, *, host: str = "127.0.0.1:7947", method: str = "GET",
        **headers: str) -> Request:
    h = {"host": host, **{k.replace("_", "-"): v for k, v in headers.items()}}
    target, _, query = path.partition("?")
    q = dict(p.split("=", 1) for p in query.split("&") if p)
    return Request(method=method, path=target, query=q, headers=h, local=LOCAL)


def call(request: Request, **kw: Any) -> Response:
    api = make_api(kw.pop("node", FakeNode()), on_leave=lambda: None, name="a", **kw)
    out: list[Response] = []

    async def main() -> None:
        out.append(await api(request))
    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    return out[0]


def headers(r: Response) -> dict[str, str]:
    return {k.lower(): v for k, v in r.headers}


# ---- the static files ----------------------------------------------------------------------


@pytest.mark.parametrize(("path", "name", "ctype"), [
    ("/ui/", "index.html", "text/html; charset=utf-8"),
    ("/ui/app.js", "app.js", "text/javascript; charset=utf-8"),
    ("/ui/style.css", "style.css", "text/css; charset=utf-8"),
])
def test_the_page_is_served_from_memory_with_a_strict_policy(path: str, name: str,
                                                             ctype: str) -> None:
    r = call(get(path))
    assert r.status == 200
    assert r.body == (UI / name).read_bytes()
    h = headers(r)
    assert h["content-type"] == ctype
    assert h["content-security-policy"] == CSP
    for directive in ("default-src 'none'", "script-src 'self'", "style-src 'self'",
                      "connect-src 'self'", "frame-ancestors 'none'", "base-uri 'none'",
                      "form-action 'none'"):
        assert directive in CSP
    assert "unsafe" not in CSP
    assert (h["x-content-type-options"], h["referrer-policy"], h["cache-control"]) == \
        ("nosniff", "no-referrer", "no-cache")
    head = call(get(path, method="HEAD"))
    assert head.status == 200 and headers(head)["content-security-policy"] == CSP


def test_ui_without_a_slash_redirects_and_nothing_else_is_served() -> None:
    r = call(get("/ui"))
    assert r.status == 301 and headers(r)["location"] == "/ui/"
    assert call(get("/ui/../../etc/passwd")).status == 404
    assert call(get("/ui/index.htm")).status == 404
    assert call(get("/ui/", method="PUT")).status == 405


def test_the_files_load_from_the_installed_package() -> None:
    files = load_files()
    assert set(files) == set(FILES)
    assert all(files[n] == (UI / n).read_bytes() for n in FILES)


# ---- the API's access rules apply to the UI as to every route ----------------------------


@pytest.mark.parametrize("path", ["/ui/", "/ui/app.js", "/v1/ui/state"])
def test_a_foreign_host_or_origin_cannot_read_the_ui(path: str) -> None:
    assert call(get(path, host="evil.example:7947")).status == 403  # DNS rebinding
    assert call(get(path, origin="http://evil.example")).status == 403
    assert call(get(path, sec_fetch_site="cross-site")).status == 403
    assert call(get(path, origin="http://127.0.0.1:7947")).status == 200  # its own page
    named = call(get(path, host="ops.internal:7947"),
                 access=ApiAccess(allowed_hosts=frozenset({"ops.internal"})))
    assert named.status == 200  # --api-allow-host
    assert call(get(path, host="ops.internal:7947")).status == 403


def test_a_token_is_not_needed_to_read_the_page_or_its_state() -> None:
    access = ApiAccess(token="s3cret")
    assert call(get("/ui/"), access=access).status == 200
    assert call(get("/v1/ui/state"), access=access).status == 200


# ---- what the page's files may hold ---------------------------------------------------------


class _Inline(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.problems: list[str] = []
        self._tag: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._tag = tag
        names = {k for k, _ in attrs}
        if tag == "style" or "style" in names or any(k.startswith("on") for k in names):
            self.problems.append(f"inline style or handler on <{tag}>")
        if tag == "script" and "src" not in names:
            self.problems.append("inline <script>")
        if tag in ("form", "iframe", "base") or (tag == "link" and ("rel", "stylesheet")
                                                 not in attrs):
            self.problems.append(f"<{tag}>")
        for k, v in attrs:
            if k in ("src", "href") and v and ("//" in v or ":" in v):
                self.problems.append(f"{k}={v}: not this origin")

    def handle_data(self, data: str) -> None:
        if self._tag == "script" and data.strip():
            self.problems.append("inline script text")


def test_the_page_holds_nothing_inline_and_loads_only_its_own_files() -> None:
    parser = _Inline()
    parser.feed((UI / "index.html").read_text())
    assert parser.problems == []


def test_the_script_never_turns_strings_into_markup_or_code() -> None:
    js = (UI / "app.js").read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(",
                 "new Function", "setTimeout('", 'setTimeout("', "javascript:", ".style."):
        assert sink not in js, sink
    # Attribute names are literals: setAttribute is only ever called by the one helper.
    assert js.count("setAttribute(") == js.count("node.setAttribute(name") + js.count(
        "svg.setAttribute('")
    # The only network reads are GETs of this API.
    assert "method:" not in js and "EventSource" not in js


# ---- the state document and its index ----------------------------------------------------


def test_the_index_ignores_rtt_and_age_and_follows_what_an_operator_sees() -> None:
    node, catalog, policies = MovingNode(), FakeCatalog(), FakePolicies()
    first = ui_state("a", node.members(), catalog, policies)
    catalog.rtt = 0.002
    again = ui_state("a", node.members(), catalog, policies)
    assert again["members"][0]["rtt_ms"] != first["members"][0]["rtt_ms"]
    assert again["index"] == first["index"]  # only volatile fields moved
    node.b_status = "failed"
    failed = ui_state("a", node.members(), catalog, policies)
    assert failed["index"] != first["index"]
    catalog.status = "critical"
    critical = ui_state("a", node.members(), catalog, policies)
    assert critical["index"] != failed["index"]
    assert state_index(critical) == critical["index"]
    policies.rejections.append({"reason": "untrusted", "detail": "0 of 1"})
    assert ui_state("a", node.members(), catalog, policies)["index"] != critical["index"]


def test_the_state_holds_members_services_with_checks_and_policies() -> None:
    doc = ui_state("a", FakeNode().members(), FakeCatalog(), FakePolicies())
    assert [m["name"] for m in doc["members"]] == ["a", "b"]
    (web,) = doc["services"]
    assert (web["name"], web["passing"], web["instances"][0]["id"]) == ("web", 2, "web-1")
    local, remote = web["instances"]
    # Our own check's output travels to the page as data (the page shows it as text).
    assert local["checks"][0]["output"] == HOSTILE
    assert "output" not in remote["checks"][0]  # other agents' outputs are not gossiped
    assert doc["policies"]["trust"]["keys"] == ["k1"] and doc["policies"]["documents"] == []
    bare = ui_state("a", [], None, None)
    assert bare["services"] is None and bare["policies"] is None
    json.dumps(doc)  # the answer is JSON


def test_a_blocking_read_waits_for_a_change_or_its_wait() -> None:
    node = MovingNode()
    api = make_api(node, on_leave=lambda: None, catalog=FakeCatalog(),
                   policies=FakePolicies(), name="a")

    async def read(query: str) -> dict[str, Any]:
        r = await api(get(f"/v1/ui/state{query}"))
        assert r.status == 200, r.body
        doc: dict[str, Any] = json.loads(r.body)
        assert headers(r)["x-rumor-index"] == doc["index"]
        return doc

    async def main() -> None:
        first = await read("")
        t0 = trio.current_time()
        same = await read(f"?index={first['index']}&wait=3s")
        assert same["index"] == first["index"]
        assert trio.current_time() - t0 == pytest.approx(3.0, abs=0.01)  # waited it out
        assert node.reads > 10  # and looked again meanwhile (every 0.2 s)

        async def fail_b_later() -> None:
            await trio.sleep(1.0)
            node.b_status = "failed"

        async with trio.open_nursery() as nursery:
            nursery.start_soon(fail_b_later)
            t0 = trio.current_time()
            changed = await read(f"?index={first['index']}&wait=10s")
        took = trio.current_time() - t0
        assert changed["members"][1]["status"] == "failed"
        assert 1.0 <= took <= 1.2 + 1e-9  # within one check of the change
        t0 = trio.current_time()
        stale = await read("?index=0123456789abcdef&wait=10s")  # another index: at once
        assert trio.current_time() == t0 and stale["index"] == changed["index"]
        capped = trio.current_time()
        await read(f"?index={changed['index']}&wait=10m")
        assert trio.current_time() - capped == pytest.approx(60.0, abs=0.01)  # at most 60 s
        with pytest.raises(HttpError) as bad:
            await api(get("/v1/ui/state?index=x&wait=soon"))
        assert bad.value.status == 400

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
