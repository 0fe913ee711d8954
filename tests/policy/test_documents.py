"""The document model itself, without TOML: subsets and header matches select as
documented, defaults are the parser's, and ``to_json`` shows what was parsed."""

from __future__ import annotations

from typing import Any

from rumor.policy.documents import (
    ALL_INSTANCES,
    HeaderMatch,
    ResilienceSpec,
    RouteRule,
    Subset,
    WeightedSubset,
)
from rumor.policy.examples import EXAMPLES
from rumor.policy.parser import DEFAULT_RESILIENCE, parse_document


def test_subsets_select_by_version_and_every_tag() -> None:
    canary = Subset("canary", version="v2", tags=("canary", "eu"))
    assert canary.matches("v2", ["eu", "canary", "x"])
    assert not canary.matches("v1", ["eu", "canary"])
    assert not canary.matches("v2", ["canary"])
    assert ALL_INSTANCES.matches("anything", [])


def test_header_matches_and_rules() -> None:
    rule = RouteRule("beta", (HeaderMatch("x-beta", "exact", "1"),
                              HeaderMatch("x-user", "prefix", "qa-"),
                              HeaderMatch("x-debug", "absent")),
                     (WeightedSubset(ALL_INSTANCES, 1),))
    assert rule.matches({"x-beta": "1", "x-user": "qa-7"})
    assert not rule.matches({"x-beta": "1", "x-user": "qa-7", "x-debug": ""})
    assert not rule.matches({"x-beta": "2", "x-user": "qa-7"})
    assert HeaderMatch("x-a", "present").to_json() == {"name": "x-a", "present": True}


def test_the_default_resilience_is_the_parsers_and_names_its_service() -> None:
    d = ResilienceSpec.default("web")
    assert d.service == "web"
    assert d.timeouts == DEFAULT_RESILIENCE.timeouts
    assert d.retries == DEFAULT_RESILIENCE.retries


def test_to_json_shows_every_example_as_parsed() -> None:
    for kind, text in EXAMPLES.items():
        doc = parse_document(text)
        shown = doc.to_json()
        assert shown["kind"] == kind and shown["name"] == doc.name
        assert shown["version"] == doc.version and isinstance(shown["spec"], dict)


def test_the_canary_route_builder_gives_a_valid_route() -> None:
    from rumor.policy.documents import RouteSpec
    from rumor.policy.examples import canary_route

    doc = parse_document(canary_route("shop", canary_weight=25, canary_tags=("canary",)))
    assert doc.name == "shop-canary" and isinstance(doc.spec, RouteSpec)
    assert [(w.subset.name, w.weight) for w in doc.spec.split] == [("stable", 75),
                                                                    ("canary", 25)]
    assert doc.spec.rules[0].matches({"x-canary": "1"})
    bare = canary_route("web", tester_header=None, header=False)
    assert "kind" not in bare and "[[rule]]" not in bare


# --- matches of the traffic features (issue 28) ------------------------------------

def test_a_path_prefix_matches_whole_segments() -> None:
    from rumor.policy.documents import PathMatch

    api = PathMatch("prefix", "/api")
    assert [api.matches(p) for p in ("/api", "/api/", "/api/x", "/api/x/y")] == [True] * 4
    assert [api.matches(p) for p in ("/apix", "/ap", "/", "/v1/api", "api")] == [False] * 5
    assert PathMatch("prefix", "/api/").matches("/api")  # a trailing "/" changes nothing
    assert not PathMatch("prefix", "/api/").matches("/apix")
    root = PathMatch("prefix", "/")
    assert root.matches("/") and root.matches("/anything")
    exact = PathMatch("exact", "/a")
    assert exact.matches("/a") and not exact.matches("/a/") and not exact.matches("/a/b")


def test_query_matches() -> None:
    from rumor.policy.documents import QueryMatch

    assert QueryMatch("debug", "exact", "1").matches({"debug": "1"})
    assert not QueryMatch("debug", "exact", "1").matches({"debug": "10"})
    assert not QueryMatch("debug", "exact", "1").matches({"Debug": "1"})  # case-sensitive
    assert not QueryMatch("debug", "exact", "1").matches({})
    assert QueryMatch("x", "present").matches({"x": ""})
    assert not QueryMatch("x", "present").matches({"y": "1"})
    assert QueryMatch("x", "absent").matches({}) and not QueryMatch("x", "absent").matches(
        {"x": "1"})


def test_rule_conditions_are_anded() -> None:
    from rumor.policy.documents import PathMatch, QueryMatch

    rule = RouteRule("r", (HeaderMatch("x-beta", "exact", "1"),),
                     (WeightedSubset(ALL_INSTANCES, 1),), PathMatch("prefix", "/api"),
                     ("GET", "HEAD"), (QueryMatch("debug", "present"),))
    every: dict[str, Any] = {"method": "GET", "path": "/api/users", "query": {"debug": "1"}}
    assert rule.matches({"x-beta": "1"}, **every)
    assert rule.matches({"x-beta": "1"}, **{**every, "method": "HEAD"})
    for change in ({"method": "POST"}, {"method": "get"}, {"path": "/apix"},
                   {"path": "/"}, {"query": {}}, {"query": None}):
        assert not rule.matches({"x-beta": "1"}, **{**every, **change}), change
    assert not rule.matches({"x-beta": "2"}, **every)
    assert not rule.matches({}, **every)
    # Built as before (headers only): every method, path and query.
    old = RouteRule("o", (HeaderMatch("x-a", "present"),), (WeightedSubset(ALL_INSTANCES, 1),))
    assert old.matches({"x-a": ""}, method="DELETE", path="/x", query={"q": "1"})
    assert old.matches({"x-a": ""})
    only_method = RouteRule("m", (), (WeightedSubset(ALL_INSTANCES, 1),), methods=("POST",))
    assert only_method.matches({}, method="POST") and not only_method.matches({})


def test_header_edits_apply() -> None:
    from rumor.policy.documents import NO_EDITS, HeaderEdits

    edits = HeaderEdits(set=(("x-env", "canary"),), add=(("x-tag", "b"),),
                        remove=("x-debug",))
    got = edits.apply([(b"Host", b"web"), (b"X-Env", b"prod"), (b"x-env", b"qa"),
                       (b"x-tag", b"a"), (b"X-Debug", b"1")])
    assert got == [(b"Host", b"web"), (b"x-tag", b"a"), (b"x-env", b"canary"),
                   (b"x-tag", b"b")]
    assert edits.names() == {"x-env", "x-tag", "x-debug"}
    assert not NO_EDITS and edits
    assert NO_EDITS.apply([(b"a", b"1")]) == [(b"a", b"1")]
    assert edits.to_json() == {"set": {"x-env": "canary"}, "add": {"x-tag": "b"},
                               "remove": ["x-debug"]}


def test_fault_rules_match_source_headers_and_route_rule() -> None:
    from rumor.policy.documents import FaultAbort, FaultDelay, FaultRule, FaultSpec

    narrow = FaultRule("narrow", ("checkout",), (HeaderMatch("x-fault", "exact", "1"),),
                       "canary", FaultDelay(0.2, 10.0), None)
    broad = FaultRule("broad", (), (), None, None, FaultAbort(503, 5.0))
    spec = FaultSpec("web", (narrow, broad))
    assert spec.rule_for("checkout", {"x-fault": "1"}, "canary") is narrow
    assert spec.rule_for("api", {"x-fault": "1"}, "canary") is broad
    assert spec.rule_for(None, {"x-fault": "1"}, "canary") is broad  # unknown caller
    assert spec.rule_for("checkout", {}, "canary") is broad
    assert spec.rule_for("checkout", {"x-fault": "1"}, None) is broad
    assert FaultSpec("web", (narrow,)).rule_for("api", {}, None) is None


def test_ratelimit_shares() -> None:
    from rumor.policy.documents import RateLimitSpec, SourceLimit

    spec = RateLimitSpec("web", 100.0, 1.0, (SourceLimit("batch", 10.0),))
    assert spec.source_rate("batch") == 10.0 and spec.source_rate("api") is None
    assert spec.source_rate(None) is None
    assert RateLimitSpec.share(100.0, 1, 4) == 25.0
    assert RateLimitSpec.share(100.0, 3, 4) == 75.0
    assert RateLimitSpec.share(100.0, 5, 5) == 100.0
    assert RateLimitSpec.share(100.0, 1, 0) == 100.0  # no live weights known: all of it
