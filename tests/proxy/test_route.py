"""The route layer's core: only what the rules read is decoded, the split is drawn from
the injected random source, and a service without a route document is one lookup."""

from __future__ import annotations

import random
import textwrap
from collections import Counter

from rumor.policy.documents import ALL_INSTANCES, NO_EDITS
from rumor.policy.evaluate import Evaluator
from rumor.policy.parser import parse_document
from rumor.proxy.route import UNROUTED, header_view, route_request

ROUTE = textwrap.dedent('''
    kind = "route"
    name = "web-route"
    version = 1
    service = "web"
    [[subset]]
    name = "v1"
    version = "v1"
    [[subset]]
    name = "v2"
    version = "v2"
    [[split]]
    subset = "v1"
    weight = 3
    [[split]]
    subset = "v2"
    weight = 1
    [[rule]]
    name = "search"
    path = { prefix = "/search" }
    query = [{ name = "beta", present = true }]
    subset = "v2"
    [rule.request_headers]
    add = { "x-beta" = "1" }
    [[rule]]
    name = "tester"
    headers = [{ name = "x-tester", exact = "yes" }]
    method = "GET"
    subset = "v2"
''')
EV = Evaluator([parse_document(ROUTE, source="test")])


def _route(target: bytes, headers: list[tuple[bytes, bytes]] | None = None,
           method: bytes = b"GET", seed: int = 1, service: str = "web") -> object:
    needs = EV.route_needs(service)
    names = needs.headers if needs is not None else frozenset()
    return route_request(EV, service, needs, method=method, target=target,
                         view=header_view(headers or [], names), rng=random.Random(seed))


def test_no_route_document_is_every_instance_without_edits() -> None:
    assert _route(b"/", service="other") is UNROUTED
    assert UNROUTED.subset is ALL_INSTANCES and UNROUTED.edits is NO_EDITS


def test_rules_read_path_query_method_and_headers() -> None:
    r = _route(b"/search/x?beta&q=1")
    assert (r.subset.name, r.rule, dict(r.edits.add)) == ("v2", "search", {"x-beta": "1"})
    assert _route(b"/searchx?beta").rule is None  # a segment prefix, not a string one
    assert _route(b"/search?q=1").rule is None
    assert _route(b"/", [(b"x-tester", b"yes")]).rule == "tester"
    assert _route(b"/", [(b"x-tester", b"yes")], method=b"POST").rule is None


def test_only_consulted_headers_are_decoded() -> None:
    view = header_view([(b"x-tester", b"yes"), (b"x-tester", b"no"), (b"cookie", b"a=1")],
                       frozenset({b"x-tester"}))
    assert view == {"x-tester": "yes"}


def test_the_split_is_drawn_from_the_injected_random() -> None:
    shares = Counter(_route(b"/", seed=s).subset.name for s in range(4000))
    assert abs(shares["v2"] - 1000) < 4 * (4000 * 0.25 * 0.75) ** 0.5
    assert _route(b"/", seed=7).subset is _route(b"/", seed=7).subset  # replays
