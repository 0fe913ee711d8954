"""The document model itself, without TOML: subsets and header matches select as
documented, defaults are the parser's, and ``to_json`` shows what was parsed."""

from __future__ import annotations

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
