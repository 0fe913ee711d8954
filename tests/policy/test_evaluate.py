"""Evaluation: weighted choice, header rules, access decisions, defaults, and conflicts
that resolve the same way whatever order the documents arrive in."""

from __future__ import annotations

import json
import textwrap
from collections import Counter
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rumor.policy.documents import (
    ALL_INSTANCES,
    Document,
    ResilienceSpec,
    RouteSpec,
    Subset,
    WeightedSubset,
)
from rumor.policy.evaluate import AccessDecision, Evaluator, RouteDecision, lower_headers
from rumor.policy.examples import EXAMPLES
from rumor.policy.parser import parse_document


def doc(text: str) -> Document:
    return parse_document(textwrap.dedent(text), source="test")


ROUTE = doc("""\
    kind = "route"
    name = "web-route"
    version = 1
    service = "web"

    [[subset]]
    name = "stable"
    version = "v1"
    [[subset]]
    name = "canary"
    version = "v2"
    tags = ["canary"]
    [[subset]]
    name = "beta"
    tags = ["beta"]

    [[split]]
    subset = "stable"
    weight = 9
    [[split]]
    subset = "canary"
    weight = 1

    [[rule]]
    name = "forced"
    headers = [{ name = "X-Canary", exact = "1" }, { name = "x-debug", present = false }]
    subset = "canary"

    [[rule]]
    name = "beta-users"
    headers = [{ name = "x-group", prefix = "beta-" }]
    split = [{ subset = "beta", weight = 1 }, { subset = "stable", weight = 1 }]

    [[rule]]
    name = "debug"
    headers = [{ name = "x-debug", present = true }]
    subset = "all"
""")


def access_doc(name: str, default: str, allow: list[str], deny: list[str],
               destination: str = "db") -> Document:
    return doc(f"""\
        kind = "access"
        name = "{name}"
        version = 1
        destination = "{destination}"
        default = "{default}"
        allow = {json.dumps(allow)}
        deny = {json.dumps(deny)}
    """)


# --- weighted choice ---------------------------------------------------------------


def decision(weights: list[int]) -> RouteDecision:
    split = tuple(WeightedSubset(Subset(f"s{i}", f"v{i}"), w) for i, w in enumerate(weights))
    return RouteDecision("web", "p", None, split)


@given(st.lists(st.integers(0, 50), min_size=1, max_size=8).filter(any))
def test_choose_matches_weights_exactly_on_a_grid(weights: list[int]) -> None:
    d = decision(weights)
    total = sum(weights)
    # The midpoints of `total` equal cells: each cell belongs to one unit of weight.
    counts = Counter(d.choose((i + 0.5) / total).name for i in range(total))
    assert counts == Counter({f"s{i}": w for i, w in enumerate(weights) if w})


def test_choose_order_and_edges() -> None:
    d = decision([3, 0, 1])
    assert [d.choose(u).name for u in (0.0, 0.5, 0.74, 0.75, 0.999999)] == [
        "s0", "s0", "s0", "s2", "s2"]
    assert d.choose(1.0 - 2**-53).name == "s2"
    for bad in (-0.1, 1.0, 2.0, float("nan")):
        with pytest.raises(ValueError, match=r"u must be in \[0, 1\)"):
            d.choose(bad)


# --- routes ------------------------------------------------------------------------


def test_no_route_document_means_all_instances() -> None:
    d = Evaluator([]).route("web", {"x-canary": "1"})
    assert (d.policy, d.rule) == (None, None)
    assert d.split == (WeightedSubset(ALL_INSTANCES, 1),)
    assert d.choose(0.7) is ALL_INSTANCES
    assert ALL_INSTANCES.matches("anything", [])


def test_default_split_when_no_rule_matches() -> None:
    d = Evaluator([ROUTE]).route("web", {"x-other": "1", "x-canary": "2"})
    assert (d.policy, d.rule) == ("web-route", None)
    assert [(w.subset.name, w.weight) for w in d.split] == [("stable", 9), ("canary", 1)]
    assert Counter(d.choose((i + 0.5) / 10).name for i in range(10)) == {"stable": 9, "canary": 1}


@pytest.mark.parametrize(("headers", "rule", "subsets"), [
    ({"X-CANARY": "1"}, "forced", ["canary"]),
    ({"x-canary": "1"}, "forced", ["canary"]),
    ({"X-Canary": "1", "X-Group": "beta-1"}, "forced", ["canary"]),  # the first rule wins
    ({"X-Canary": "1", "X-Debug": ""}, "debug", ["all"]),  # x-debug must be absent for rule 0
    ({"x-canary": "1 "}, None, ["stable", "canary"]),  # exact means exact
    ({"x-canary": "TRUE"}, None, ["stable", "canary"]),
    ({"X-Group": "beta-eu"}, "beta-users", ["beta", "stable"]),
    ({"x-group": "beta-"}, "beta-users", ["beta", "stable"]),
    ({"x-group": "Beta-eu"}, None, ["stable", "canary"]),  # values are case-sensitive
    ({"x-group": "beta-eu", "x-debug": "1"}, "beta-users", ["beta", "stable"]),
    ({"x-debug": "0"}, "debug", ["all"]),
    ({}, None, ["stable", "canary"]),
])
def test_header_rules(headers: dict[str, str], rule: str | None, subsets: list[str]) -> None:
    d = Evaluator([ROUTE]).route("web", headers)
    assert d.rule == rule
    assert [w.subset.name for w in d.split] == subsets


def test_first_spelling_of_a_header_wins() -> None:
    assert lower_headers({"X-Canary": "1", "x-canary": "0"}) == {"x-canary": "1"}
    assert Evaluator([ROUTE]).route("web", {"X-Canary": "1", "x-canary": "0"}).rule == "forced"


def test_other_services_are_not_routed_by_the_document() -> None:
    assert Evaluator([ROUTE]).route("api", {"x-canary": "1"}).policy is None


def test_subset_matches() -> None:
    canary = Subset("canary", "v2", ("canary", "eu"))
    assert canary.matches("v2", ["eu", "canary", "x"])
    assert canary.matches("v2", iter(["eu", "canary"]))
    assert not canary.matches("v2", ["canary"])
    assert not canary.matches("v1", ["eu", "canary"])
    assert Subset("t", None, ("a",)).matches("", ["a"])
    assert Subset("v", "v1").matches("v1", [])


def test_route_json() -> None:
    d = Evaluator([ROUTE]).route("web", {"x-group": "beta-1"})
    assert d.to_json() == {
        "service": "web", "policy": "web-route", "rule": "beta-users",
        "split": [{"name": "beta", "version": None, "tags": ["beta"], "weight": 1},
                  {"name": "stable", "version": "v1", "tags": [], "weight": 1}]}


# --- resilience --------------------------------------------------------------------


def test_resilience_default_and_document() -> None:
    res = doc(EXAMPLES["resilience"])
    ev = Evaluator([res])
    assert ev.resilience("web") == res.spec
    assert ev.resilience("api") == ResilienceSpec.default("api")
    assert ev.policy_name("resilience", "web") == "web-resilience"
    assert ev.policy_name("resilience", "api") is None
    assert ev.policy_name("nonsense", "web") is None


# --- access ------------------------------------------------------------------------


def test_no_access_document_allows() -> None:
    d = Evaluator([]).access("api", "db")
    assert d == AccessDecision(True, 'no access policy for "db": allowed', None, "api", "db")
    assert Evaluator([]).access(None, "db").allowed


def test_default_deny() -> None:
    ev = Evaluator([access_doc("db-access", "deny", ["api"], [])])
    assert ev.access("api", "db").allowed
    d = ev.access("web", "db")
    assert not d.allowed
    assert d.reason == 'denied by access policy "db-access": source "web" not allowed'
    assert d.policy == "db-access"


def test_deny_beats_allow() -> None:
    ev = Evaluator([access_doc("db-access", "allow", ["*"], ["batch"])])
    d = ev.access("batch", "db")
    assert not d.allowed
    assert d.reason == 'denied by access policy "db-access": source "batch" is denied'
    assert ev.access("api", "db").allowed
    ev = Evaluator([access_doc("db-access", "allow", ["api"], ["*"])])
    d = ev.access("api", "db")
    assert not d.allowed and 'every source is denied ("*")' in d.reason


def test_wildcard_allow() -> None:
    ev = Evaluator([access_doc("db-access", "deny", ["*"], ["batch"])])
    d = ev.access("anyone", "db")
    assert d.allowed and 'any source is allowed ("*")' in d.reason
    assert not ev.access("batch", "db").allowed


def test_unknown_source() -> None:
    # Only a default allow or a "*" allow lets a caller of unknown identity in.
    assert not Evaluator([access_doc("a", "deny", ["api"], [])]).access(None, "db").allowed
    assert Evaluator([access_doc("a", "deny", ["*"], [])]).access(None, "db").allowed
    assert Evaluator([access_doc("a", "allow", [], ["batch"])]).access(None, "db").allowed
    assert not Evaluator([access_doc("a", "allow", [], ["*"])]).access(None, "db").allowed
    d = Evaluator([access_doc("a", "deny", ["api"], [])]).access(None, "db")
    assert d.reason == 'denied by access policy "a": caller of unknown identity not allowed'
    assert d.to_json() == {"allowed": False, "reason": d.reason, "policy": "a",
                           "source": None, "destination": "db"}


def test_default_allow_for_unlisted() -> None:
    d = Evaluator([access_doc("a", "allow", ["api"], ["batch"])]).access("web", "db")
    assert d.allowed
    assert d.reason == 'allowed by access policy "a": source "web" not listed, default allow'


def test_access_applies_to_its_destination_only() -> None:
    ev = Evaluator([access_doc("a", "deny", [], [])])
    assert not ev.access("api", "db").allowed
    assert ev.access("api", "web").allowed


# --- callers holding several names (a certificate naming several services) ------------


def test_a_caller_holding_a_denied_name_is_denied_unless_it_declares_an_allowed_one(
        ) -> None:
    """The finding: deny = ["web", "batch"], default allow; a certificate naming web
    and batch, no source header, was judged "unknown identity" and let in."""
    ev = Evaluator([access_doc("db-access", "allow", [], ["web", "batch"])])
    assert not ev.access_as(None, {"web"}, "db").allowed
    d = ev.access_as(None, {"web", "batch"}, "db")
    assert not d.allowed
    assert d.source == "batch" and d.holds == ("batch", "web")
    assert d.reason.startswith('denied by access policy "db-access": source "batch" is '
                               'denied (the caller\'s certificate names "batch", "web"')
    assert "declare one with x-rumor-source" in d.reason
    # One denied name is enough; declaring an allowed one of its names lets it in...
    ev = Evaluator([access_doc("db-access", "allow", [], ["batch"])])
    assert not ev.access_as(None, {"web", "batch"}, "db").allowed
    assert ev.access_as("web", {"web", "batch"}, "db").allowed
    # ...declaring the denied one does not, nor does a name it does not hold.
    assert not ev.access_as("batch", {"web", "batch"}, "db").allowed
    d = ev.access_as("api", {"web", "batch"}, "db")
    assert not d.allowed and "does not name" in d.reason


def test_with_default_deny_every_held_name_must_be_allowed() -> None:
    ev = Evaluator([access_doc("db-access", "deny", ["api", "web"], [])])
    assert ev.access_as(None, {"api", "web"}, "db").allowed
    d = ev.access_as(None, {"api", "batch"}, "db")  # batch is not allowed
    assert not d.allowed and 'source "batch" not allowed' in d.reason
    assert ev.access_as("api", {"api", "batch"}, "db").allowed  # it says who it is
    # "*" in allow lets in any name, so any set of them; "*" in deny keeps all out.
    assert Evaluator([access_doc("a", "deny", ["*"], [])]).access_as(
        None, {"x", "y"}, "db").allowed
    assert not Evaluator([access_doc("a", "allow", [], ["*"])]).access_as(
        None, {"x", "y"}, "db").allowed


def test_one_name_none_and_no_document() -> None:
    ev = Evaluator([access_doc("db-access", "deny", ["api"], [])])
    assert ev.access_as(None, {"api"}, "db") == ev.access("api", "db")
    assert ev.access_as(None, set(), "db") == ev.access(None, "db")
    assert ev.access_as("api", set(), "db") == ev.access("api", "db")  # no TLS
    d = Evaluator([]).access_as(None, {"a", "b"}, "db")
    assert d.allowed and d.reason == 'no access policy for "db": allowed'
    assert d.to_json()["holds"] == ["a", "b"]
    d = ev.access_as(None, {"api", "web"}, "db")
    assert ev.access_as(None, ["web", "api"], "db") is d  # decided once per set
    # GET /v1/evaluate/db?holds=api,web explains the same decision.
    assert ev.evaluate("db", holds=["web", "api"])["access"] == d.to_json()
    assert ev.evaluate("db", source="api", holds=["web", "api"])["access"]["allowed"]
    assert not ev.evaluate("db", holds=["web", "api"])["access"]["allowed"]


NAMES = st.sampled_from(["api", "web", "batch", "db", "x"])


@settings(max_examples=300, deadline=None)
@given(default=st.sampled_from(["allow", "deny"]),
       allow=st.sets(st.sampled_from(["api", "web", "batch", "*"]), max_size=3),
       deny=st.sets(st.sampled_from(["web", "batch", "db", "*"]), max_size=3),
       holds=st.sets(NAMES, min_size=2, max_size=4))
def test_several_names_never_get_more_than_the_least_privileged_one(
        default: str, allow: set[str], deny: set[str], holds: set[str]) -> None:
    deny -= allow  # a name may not be in both lists
    ev = Evaluator([access_doc("a", default, sorted(allow), sorted(deny))])
    together = ev.access_as(None, holds, "db").allowed
    assert together == all(ev.access(n, "db").allowed for n in holds)
    # Declaring one of its names is judged as that name alone.
    for n in holds:
        assert ev.access_as(n, holds, "db").allowed == ev.access(n, "db").allowed


# --- conflicts and determinism -----------------------------------------------------


CONFLICTING = [
    access_doc("z-access", "allow", [], [], destination="db"),
    access_doc("b-access", "deny", ["api"], [], destination="db"),
    access_doc("m-access", "deny", [], [], destination="db"),
    access_doc("web-access", "deny", ["*"], [], destination="web"),
    ROUTE,
    doc(EXAMPLES["route"].replace('name = "web-canary"', 'name = "a-route"')),
    doc(EXAMPLES["route"]),
    doc(EXAMPLES["resilience"]),
    doc(EXAMPLES["trust"]),
]


def test_conflicts_pick_the_lowest_name() -> None:
    ev = Evaluator(CONFLICTING)
    assert ev.conflicts == [
        'access: 3 documents apply to service "db" ("b-access" v1, "m-access" v1, '
        '"z-access" v1); using "b-access" v1, the lowest name',
        'route: 3 documents apply to service "web" ("a-route" v1, "web-canary" v1, '
        '"web-route" v1); using "a-route" v1, the lowest name',
    ]
    assert ev.access("api", "db").policy == "b-access"
    assert ev.route("web", {}).policy == "a-route"
    assert ev.evaluate("db")["conflicts"] == [ev.conflicts[0]]
    assert ev.evaluate("web")["conflicts"] == [ev.conflicts[1]]
    assert ev.evaluate("api")["conflicts"] == []


def test_same_name_twice_prefers_the_higher_version() -> None:
    v1 = access_doc("a", "deny", [], [])
    v2 = doc(EXAMPLES["access"].replace('name = "db-access"', 'name = "a"')
             .replace("version = 1", "version = 2"))
    ev = Evaluator([v1, v2])
    assert ev.access("api", "db").allowed  # v2 allows api
    assert ev.conflicts == ['access: 2 documents apply to service "db" ("a" v2, "a" v1); '
                            'using "a" v2, the lowest name']


@settings(max_examples=60, deadline=None)
@given(st.permutations(CONFLICTING), st.sampled_from(["api", "batch", None]),
       st.sampled_from([{}, {"x-canary": "1"}, {"X-User-Group": "beta-9"}]))
def test_decisions_do_not_depend_on_document_order(
        docs: list[Document], source: str | None, headers: dict[str, str]) -> None:
    reference = Evaluator(CONFLICTING)
    ev = Evaluator(docs)
    assert ev.conflicts == reference.conflicts
    assert ev.documents == reference.documents
    for service in ("db", "web", "api"):
        assert ev.evaluate(service, source=source, headers=headers) == reference.evaluate(
            service, source=source, headers=headers)


# --- the API summary ---------------------------------------------------------------


def test_evaluate_is_json_ready() -> None:
    ev = Evaluator([ROUTE, doc(EXAMPLES["resilience"]), access_doc("db-access", "deny", [],
                                                                    [], destination="web")])
    out = ev.evaluate("web", source="api", headers={"X-Canary": "1"})
    assert json.loads(json.dumps(out)) == out
    assert out["service"] == "web"
    assert out["route"]["rule"] == "forced"
    assert out["route"]["split"] == [{"name": "canary", "version": "v2", "tags": ["canary"],
                                      "weight": 1}]
    assert out["resilience"]["policy"] == "web-resilience"
    assert out["resilience"]["timeouts"] == {"connect": "1s", "per_try": "3s",
                                             "overall": "10s"}
    assert out["access"]["allowed"] is False
    assert out["conflicts"] == []
    defaults = Evaluator([]).evaluate("api")
    assert defaults["route"]["policy"] is None
    assert defaults["resilience"]["policy"] is None
    assert defaults["resilience"]["retries"]["on"] == ["connect-failure", "502", "503"]
    assert defaults["access"] == {"allowed": True, "reason": 'no access policy for "api": '
                                  "allowed", "policy": None, "source": None,
                                  "destination": "api"}


def test_trust_documents_are_not_service_policies() -> None:
    ev = Evaluator([doc(EXAMPLES["trust"])])
    assert ev.conflicts == []
    assert ev.evaluate("trust")["route"]["policy"] is None


def test_the_proxy_is_told_which_headers_the_rules_consult() -> None:
    ev = Evaluator([ROUTE])
    assert ev.route_headers("web") == {b"x-canary", b"x-debug", b"x-group"}
    assert ev.route_headers("api") is None  # no route document: decode nothing
    # Deciding on only those headers gives the decision all headers would.
    full = {"X-Canary": "1", "X-Other": "y", "X-Group": "beta-1"}
    only = {k.lower(): v for k, v in full.items()
            if k.lower().encode() in (ev.route_headers("web") or ())}
    assert ev.route("web", only) == ev.route("web", full)


def test_a_service_without_a_resilience_document_gets_one_default_object() -> None:
    ev = Evaluator([])
    assert ev.resilience("web") is ev.resilience("web")
    assert ev.resilience("web").service == "web" and ev.resilience("db").service == "db"


def test_access_is_decided_once_per_caller_and_destination() -> None:
    ev = Evaluator([access_doc("db-access", "deny", ["api"], [])])
    first = ev.access("api", "db")
    assert first.allowed and ev.access("api", "db") is first
    assert not ev.access("web", "db").allowed
    for i in range(5000):  # callers named by requests cannot grow the memo without bound
        ev.access(f"scanner-{i}", "db")
    assert len(ev._access_decisions) <= 4097


# --- the traffic features of issue 28 ----------------------------------------------

PATH_ROUTE = doc("""\
    kind = "route"
    name = "web-paths"
    version = 1
    service = "web"
    [[subset]]
    name = "canary"
    version = "v2"

    [[rule]]
    name = "debug-reads"
    method = ["GET", "HEAD"]
    path = { prefix = "/api" }
    query = [{ name = "debug", exact = "1" }]
    subset = "canary"
    [rule.request_headers]
    set = { "x-env" = "canary" }
    remove = ["x-debug"]

    [[rule]]
    name = "admin"
    path = { exact = "/admin" }
    headers = [{ name = "x-admin", present = true }]
    subset = "canary"

    [[rule]]
    name = "writes"
    method = "POST"
    subset = "all"
""")


def fault_doc(name: str, service: str = "web", percent: float = 5.0) -> Document:
    return doc(f"""\
        kind = "fault"
        name = "{name}"
        version = 1
        expires = 2030-01-01T00:00:00Z
        service = "{service}"
        [[rule]]
        name = "testers"
        headers = [{{ name = "x-fault", exact = "1" }}]
        sources = ["checkout"]
        delay = {{ duration = "1s", percent = 100.0 }}
        [[rule]]
        name = "all"
        abort = {{ status = 503, percent = {percent} }}
    """)


def limit_doc(name: str, rate: int = 100) -> Document:
    return doc(f"""\
        kind = "ratelimit"
        name = "{name}"
        version = 1
        service = "web"
        requests_per_second = {rate}
        [[source]]
        name = "batch"
        requests_per_second = 5
    """)


@pytest.mark.parametrize(("method", "path", "query", "headers", "rule"), [
    ("GET", "/api", {"debug": "1"}, {}, "debug-reads"),
    ("HEAD", "/api/users/7", {"debug": "1", "x": "2"}, {}, "debug-reads"),
    ("GET", "/apix", {"debug": "1"}, {}, None),  # not the segment /api
    ("GET", "/api", {"debug": "2"}, {}, None),
    ("GET", "/api", {}, {}, None),
    ("PUT", "/api", {"debug": "1"}, {}, None),
    ("GET", "/admin", {}, {"X-Admin": ""}, "admin"),
    ("GET", "/admin/", {}, {"x-admin": "1"}, None),  # exact
    ("GET", "/admin", {}, {}, None),
    ("POST", "/api", {"debug": "1"}, {}, "writes"),
    ("POST", "/anything", {}, {}, "writes"),
    ("post", "/anything", {}, {}, None),  # methods are case-sensitive
])
def test_rules_match_path_method_query_and_headers(
        method: str, path: str, query: dict[str, str], headers: dict[str, str],
        rule: str | None) -> None:
    d = Evaluator([PATH_ROUTE]).route("web", headers, method=method, path=path, query=query)
    assert d.rule == rule
    assert d.policy == "web-paths"


def test_a_matched_rule_carries_its_header_edits() -> None:
    ev = Evaluator([PATH_ROUTE])
    d = ev.route("web", {}, method="GET", path="/api", query={"debug": "1"})
    assert d.request_headers.set == (("x-env", "canary"),)
    assert d.request_headers.remove == ("x-debug",)
    assert d.to_json()["request_headers"] == {"set": {"x-env": "canary"}, "add": {},
                                              "remove": ["x-debug"]}
    # No rule, another rule, or no document: no edits.
    assert not ev.route("web", {}, method="GET", path="/").request_headers
    assert not ev.route("web", {}, method="POST").request_headers
    assert not Evaluator([]).route("web", {}).request_headers
    assert "request_headers" not in ev.route("web", {}).to_json()
    # The defaults are a GET of "/" without query (the old two-argument call).
    assert ev.route("web", {}).rule is None
    assert Evaluator([ROUTE]).route("web", {"x-canary": "1"}).rule == "forced"


def test_route_needs_say_what_rules_read() -> None:
    from rumor.policy.evaluate import RouteNeeds

    assert isinstance(ROUTE.spec, RouteSpec)
    shop = replace(ROUTE, name="z", spec=replace(ROUTE.spec, service="shop"))
    ev = Evaluator([PATH_ROUTE, shop])
    assert ev.route_needs("web") == RouteNeeds(frozenset({b"x-admin"}), True, True, True)
    assert ev.route_headers("web") == frozenset({b"x-admin"})
    assert ev.route_needs("shop") == RouteNeeds(
        frozenset({b"x-canary", b"x-debug", b"x-group"}), False, False, False)
    assert ev.route_needs("nothing") is None and ev.route_headers("nothing") is None
    no_rules = doc('kind = "route"\nname = "r"\nversion = 1\nservice = "db"\n')
    assert Evaluator([no_rules]).route_needs("db") == RouteNeeds()
    only_method = doc('kind = "route"\nname = "m"\nversion = 1\nservice = "db"\n'
                      '[[rule]]\nmethod = "GET"\nsubset = "all"\n')
    assert Evaluator([only_method]).route_needs("db") == RouteNeeds(frozenset(), False, True,
                                                                    False)


def test_fault_and_ratelimit_lowest_name_wins() -> None:
    a, b = fault_doc("a-fault", percent=1.0), fault_doc("b-fault", percent=2.0)
    ev = Evaluator([b, a, fault_doc("other", service="db")])
    found = ev.fault("web")
    assert found is not None and found[0] == "a-fault" and found[1] is a.spec
    assert any("fault: 2 documents" in c for c in ev.conflicts)
    assert ev.fault("api") is None
    assert ev.policy_name("fault", "db") == "other"
    assert ev.names("db")
    limits = Evaluator([limit_doc("z-limit", 1), limit_doc("m-limit", 2)])
    got = limits.ratelimit("web")
    assert got is not None and got[0] == "m-limit" and got[1].rate == 2.0
    assert limits.ratelimit("db") is None and limits.policy_name("ratelimit", "web") == "m-limit"


def test_evaluate_shows_fault_ratelimit_and_balancer() -> None:
    bal = doc('kind = "resilience"\nname = "web-res"\nversion = 1\nservice = "web"\n'
              'balancer = "hash"\nhash = { header = "x-user" }\n')
    ev = Evaluator([PATH_ROUTE, fault_doc("web-fault"), limit_doc("web-limit"), bal])
    out = ev.evaluate("web", source="checkout", headers={"X-Fault": "1"}, method="GET",
                      path="/api/x", query={"debug": "1"})
    json.dumps(out)
    assert out["route"]["rule"] == "debug-reads"
    assert out["request"] == {"method": "GET", "path": "/api/x", "query": {"debug": "1"},
                              "source": "checkout"}
    assert out["fault"]["policy"] == "web-fault"
    assert out["fault"]["applies"]["name"] == "testers"
    assert out["ratelimit"]["policy"] == "web-limit"
    assert out["ratelimit"]["requests_per_second"] == 100.0
    assert out["ratelimit"]["source_limit"] is None
    assert out["balancer"]["algorithm"] == "hash"
    assert out["balancer"]["hash"] == {"header": "x-user"}
    assert out["resilience"]["balancer"]["algorithm"] == "hash"
    other = ev.evaluate("web", source="batch")
    assert other["fault"]["applies"]["name"] == "all"
    assert other["ratelimit"]["source_limit"] == 5.0
    assert other["route"]["rule"] is None
    bare = Evaluator([]).evaluate("web")
    assert bare["fault"] is None and bare["ratelimit"] is None
    assert bare["balancer"]["algorithm"] == "peak_ewma"


def test_split_target_and_parse_query() -> None:
    from rumor.policy.evaluate import parse_query, split_target

    assert split_target("/a/b?x=1&y#frag") == ("/a/b", "x=1&y")
    assert split_target("/a") == ("/a", "")
    assert parse_query("x=1&y&x=2&a%20b=c+d&&=v") == {"x": "1", "y": "", "a b": "c d",
                                                       "": "v"}
    assert parse_query("") == {}
    many = "&".join(f"p{i}=1" for i in range(1000))
    assert len(parse_query(many)) == 256
