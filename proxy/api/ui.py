# layer: shell — reads the page from the package and waits on trio's clock
"""The live web UI of the local API (``docs/ui.md``): static files and one blocking read.

- `GET /ui` -> 301 to `/ui/`; `GET /ui/`, `/ui/app.js`, `/ui/style.css` -> the page,
  read from the package (``rumor/proxy/ui/``) once, when the API is built, and served
  from memory with a strict Content-Security-Policy: scripts, styles and fetches from
  this origin only, nothing inline, no frames, no forms.
- `GET /v1/ui/state?index=I&wait=10s` -> `{"index", "agent", "members", "services",
  "policies"}` (``ui_state.py``). With `index` equal to the current one, the answer
  waits until the state differs or `wait` (at most 60 s) elapses, checking every 0.2 s.

Every route sits behind the API's access rules like any other (``access.py``): a page
that is not this API's own cannot read them. All of them are reads; the page's
guarded reads (explain, tap) send the token the operator pasted, as any client does.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import resources
from typing import Any

import trio

from ...gossip.durations import parse_duration
from .catalog import INDEX_HEADER, CatalogApi
from .policies import PolicyApi
from .router import Router
from .server import HttpError, Request, Response, json_response
from .ui_state import ui_state

#: The page's files and their types; nothing else under /ui/ is served.
FILES = {"index.html": "text/html; charset=utf-8",
         "app.js": "text/javascript; charset=utf-8",
         "style.css": "text/css; charset=utf-8"}
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
       "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
SECURITY_HEADERS = [("content-security-policy", CSP), ("x-content-type-options", "nosniff"),
                    ("referrer-policy", "no-referrer")]
DEFAULT_WAIT = 10.0
MAX_WAIT = 60.0
#: How often a blocking read rebuilds the state to compare (members have no change event).
POLL = 0.2


def load_files() -> dict[str, bytes]:
    """The page's files from the installed package."""
    root = resources.files("rumor.proxy").joinpath("ui")
    return {name: root.joinpath(name).read_bytes() for name in FILES}


def add_ui_routes(router: Router, members: Callable[[], list[dict[str, Any]]],
                  catalog: CatalogApi | None, policies: PolicyApi | None, agent: str,
                  files: dict[str, bytes] | None = None) -> None:
    """Register the page and its state route; ``members`` is ``Node.members``."""
    static = files if files is not None else load_files()

    def serve(name: str) -> Response:
        return Response(200, [("content-type", FILES[name]), ("cache-control", "no-cache"),
                              *SECURITY_HEADERS], static[name])

    async def page(request: Request) -> Response:
        if not request.path.endswith("/"):
            # Relative links (app.js, style.css) must resolve under /ui/.
            return Response(301, [("location", "/ui/"), ("cache-control", "no-cache"),
                                  *SECURITY_HEADERS], b"")
        return serve("index.html")

    async def script(request: Request) -> Response:
        return serve("app.js")

    async def style(request: Request) -> Response:
        return serve("style.css")

    async def state(request: Request) -> Response:
        want = request.query.get("index")
        try:
            wait = min(parse_duration(request.query.get("wait", f"{DEFAULT_WAIT:g}s")),
                       MAX_WAIT)
        except ValueError as e:
            raise HttpError(400, str(e)) from None
        deadline = trio.current_time() + wait
        while True:
            doc = ui_state(agent, members(), catalog, policies)
            left = deadline - trio.current_time()
            if want is None or doc["index"] != want or left <= 0:
                return json_response(doc, headers=[(INDEX_HEADER, doc["index"]),
                                                   ("cache-control", "no-store")])
            await trio.sleep(min(POLL, left))

    router.add("GET", "/ui", page)
    router.add("GET", "/ui/app.js", script)
    router.add("GET", "/ui/style.css", style)
    router.add("GET", "/v1/ui/state", state)


__all__ = ["CSP", "FILES", "add_ui_routes", "load_files"]
