"""Policy documents: every kind parses, every example parses and shows every field, and
every mistake gets a PolicyError naming the field, what was expected and what was found.
Hypothesis feeds arbitrary bytes, text and mutated tables to check that nothing but
PolicyError ever escapes, since documents arrive from peers."""

from __future__ import annotations

import contextlib
import pickle
import re
import textwrap
import tomllib
from datetime import UTC, date, datetime, time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rumor.gossip.durations import parse_duration
from rumor.policy.documents import (
    ALL_INSTANCES,
    FIELDS,
    HEADER_FIELDS,
    KINDS,
    MAX_DOCUMENT_BYTES,
    AccessSpec,
    Document,
    HeaderMatch,
    PolicyError,
    ResilienceSpec,
    RouteSpec,
    Subset,
    TrustSpec,
    WeightedSubset,
    format_duration,
)
from rumor.policy.examples import EXAMPLES
from rumor.policy.keys import SecretKey
from rumor.policy.parser import document_from_table, parse_document

KEY_A = "rumor-ed25519 w858oo7II2G5/PujEmqBs2m/SPhaMnXSUVdvB2XA9YM= a8ebc03450363429"
KEY_B = "7UfbY1FqBIwAx9+D6ZGSVELX+57sKKyKpOVXm/cPhbE="

ROUTE = """\
kind = "route"
name = "web-route"
version = 2
service = "web"

[[subset]]
name = "v1"
version = "v1"

[[subset]]
name = "canary"
tags = ["canary", "eu"]

[[split]]
subset = "v1"
weight = 3

[[split]]
subset = "canary"
weight = 1

[[rule]]
headers = [{ name = "X-Canary", exact = "1" }]
subset = "canary"
"""

RESILIENCE = """\
kind = "resilience"
name = "web-resilience"
version = 1
service = "web"
"""

ACCESS = """\
kind = "access"
name = "web-access"
version = 1
destination = "web"
default = "deny"
allow = ["api"]
"""

TRUST = f"""\
kind = "trust"
name = "trust"
version = 1
keys = ["{KEY_A}", "{KEY_B}"]
threshold = 2
"""


def parse(text: str) -> Document:
    return parse_document(textwrap.dedent(text), source="test.toml")


def error(text: str) -> PolicyError:
    with pytest.raises(PolicyError) as info:
        parse(text)
    return info.value


def with_body(kind_doc: str, extra: str) -> str:
    return kind_doc + textwrap.dedent(extra)


# --- the kinds and the examples ----------------------------------------------------


def test_route_parses() -> None:
    doc = parse(ROUTE)
    assert (doc.kind, doc.name, doc.version, doc.expires, doc.description) == (
        "route", "web-route", 2, None, "")
    assert doc.service == "web"
    spec = doc.spec
    assert isinstance(spec, RouteSpec)
    v1, canary = Subset("v1", "v1"), Subset("canary", None, ("canary", "eu"))
    assert spec.subsets == (v1, canary)
    assert spec.split == (WeightedSubset(v1, 3), WeightedSubset(canary, 1))
    (rule,) = spec.rules
    assert rule.name == "rule[0]"
    assert rule.headers == (HeaderMatch("x-canary", "exact", "1"),)
    assert rule.split == (WeightedSubset(canary, 1),)


def test_route_without_split_goes_to_all_instances() -> None:
    doc = parse('kind = "route"\nname = "r"\nversion = 1\nservice = "web"\n')
    assert isinstance(doc.spec, RouteSpec)
    assert doc.spec.split == (WeightedSubset(ALL_INSTANCES, 1),)
    assert doc.spec.subsets == () and doc.spec.rules == ()


def test_route_split_may_use_builtin_all_subset() -> None:
    doc = parse(ROUTE.replace('subset = "canary"\nweight = 1', 'subset = "all"\nweight = 1'))
    assert isinstance(doc.spec, RouteSpec)
    assert doc.spec.split[1].subset is ALL_INSTANCES


def test_resilience_defaults() -> None:
    doc = parse(RESILIENCE)
    spec = doc.spec
    assert isinstance(spec, ResilienceSpec)
    assert spec == ResilienceSpec.default("web")
    assert (spec.timeouts.connect, spec.timeouts.per_try, spec.timeouts.overall) == (
        2.0, 15.0, 15.0)
    assert spec.retries.attempts == 3
    assert spec.retries.on == ("connect-failure", "502", "503")
    assert not spec.retries.non_idempotent
    assert (spec.retries.budget.ratio, spec.retries.budget.min_per_second) == (0.2, 10)
    assert spec.circuit_breaker.max_requests == 1024
    assert spec.outlier_ejection.enabled
    assert spec.outlier_ejection.consecutive_failures == 5


def test_resilience_default_for_any_service_name() -> None:
    # The evaluator asks for defaults for whatever name a request carries.
    assert ResilienceSpec.default("Not A Service!").service == "Not A Service!"


def test_resilience_timeouts_follow_each_other() -> None:
    spec = parse(with_body(RESILIENCE, '[timeouts]\noverall = "1s"\n')).spec
    assert isinstance(spec, ResilienceSpec)
    # Unset per_try takes overall, unset connect is at most per_try.
    assert (spec.timeouts.connect, spec.timeouts.per_try, spec.timeouts.overall) == (
        1.0, 1.0, 1.0)


def test_resilience_full() -> None:
    spec = parse(with_body(RESILIENCE, """
        [timeouts]
        connect = "100ms"
        per_try = "2s"
        overall = "1m"
        [retries]
        attempts = 2
        on = ["connect-failure", 504]
        non_idempotent = true
        backoff = "10ms"
        max_backoff = "1s"
        budget = { ratio = 0.5, min_per_second = 0, window = "30s" }
        [circuit_breaker]
        max_requests = 10
        max_pending = 0
        [outlier_ejection]
        enabled = false
        consecutive_failures = 2
        base_ejection_time = "1s"
        max_ejection_time = "1h"
        max_ejected_percent = 100
    """)).spec
    assert isinstance(spec, ResilienceSpec)
    assert (spec.timeouts.connect, spec.timeouts.per_try, spec.timeouts.overall) == (
        0.1, 2.0, 60.0)
    assert spec.retries.on == ("connect-failure", "504")
    assert spec.retries.non_idempotent
    assert (spec.retries.backoff, spec.retries.max_backoff) == (0.01, 1.0)
    assert spec.retries.budget.window == 30.0
    assert (spec.circuit_breaker.max_requests, spec.circuit_breaker.max_pending) == (10, 0)
    assert not spec.outlier_ejection.enabled
    assert spec.outlier_ejection.max_ejection_time == 3600.0


def test_retry_and_ejection_helpers() -> None:
    spec = ResilienceSpec.default("web")
    r = spec.retries
    assert r.retryable("GET", "503") and r.retryable("put", "502")
    assert not r.retryable("POST", "503")
    assert r.retryable("POST", "connect-failure")  # never reached the instance
    assert not r.retryable("GET", "504")  # not in the default conditions
    assert [r.backoff_ceiling(n) for n in (1, 2, 3, 4, 5, 100)] == [
        0.025, 0.05, 0.1, 0.2, 0.25, 0.25]
    o = spec.outlier_ejection
    assert [o.ejection_time(n) for n in (1, 2, 3, 20)] == [30.0, 60.0, 90.0, 300.0]
    assert [o.max_ejected(n) for n in (0, 1, 2, 3, 10)] == [0, 0, 1, 1, 5]


def test_access_parses() -> None:
    doc = parse(ACCESS)
    assert doc.spec == AccessSpec("web", "deny", ("api",), ())
    assert doc.service == "web"


def test_trust_parses() -> None:
    doc = parse(TRUST)
    spec = doc.spec
    assert isinstance(spec, TrustSpec)
    assert [k.line() for k in spec.keys] == [KEY_A, spec.keys[1].line()]
    assert spec.keys[1].b64() == KEY_B
    assert spec.threshold == 2
    assert doc.service is None


def test_expires_offset_datetime() -> None:
    doc = parse(ACCESS + "expires = 2030-01-01T02:00:00+02:00\n")
    assert doc.expires == datetime(2030, 1, 1, tzinfo=UTC).timestamp()
    assert doc.to_json()["expires"] == "2030-01-01T00:00:00Z"


def test_description() -> None:
    assert parse(ACCESS + 'description = """two\nlines"""\n').description == "two\nlines"


@pytest.mark.parametrize("kind", KINDS)
def test_examples_parse(kind: str) -> None:
    doc = parse_document(EXAMPLES[kind], source=f"example-{kind}.toml")
    assert doc.kind == kind
    assert doc.to_json()["kind"] == kind


@pytest.mark.parametrize("kind", KINDS)
def test_examples_show_every_field(kind: str) -> None:
    text = EXAMPLES[kind]
    tables = [p for p in FIELDS if p == kind or p.startswith(kind + ".")]
    keys = set(HEADER_FIELDS) | {k for p in tables for k in FIELDS[p]}
    # A key shows as `key =` (possibly commented out), as a table header or inline.
    missing = [k for k in sorted(keys) if not re.search(
        rf"(^|[\s{{\[.#]){re.escape(k)}\s*(=|\]\])|\[{re.escape(k)}\]|\.{re.escape(k)}\]",
        text, re.M)]
    if kind == "trust":
        missing.remove("expires")  # trust documents do not expire
    assert not missing, f"example {kind} does not show {missing}"
    # Printed examples fit the project's line length.
    assert max(len(line) for line in text.splitlines()) <= 100


def test_examples_are_different_documents() -> None:
    names = {parse_document(t).name for t in EXAMPLES.values()}
    assert len(names) == len(KINDS)


def test_fresh_keys_parse_in_trust_documents() -> None:
    keys = [SecretKey.generate().public for _ in range(3)]
    text = ('kind = "trust"\nname = "trust"\nversion = 7\nthreshold = 3\nkeys = ['
            + ", ".join(f'"{k.line()}"' for k in keys) + "]\n")
    spec = parse(text).spec
    assert isinstance(spec, TrustSpec) and spec.keys == tuple(keys)


# --- errors ------------------------------------------------------------------------


def test_error_format() -> None:
    e = PolicyError("a.toml", "split[1].weight", "expected x, found y")
    assert str(e) == "a.toml: split[1].weight: expected x, found y"
    assert str(PolicyError("a.toml", "", "too big")) == "a.toml: too big"
    copy = pickle.loads(pickle.dumps(e))
    assert (copy.source, copy.field, copy.message) == (e.source, e.field, e.message)
    assert isinstance(e, ValueError)


def test_default_source() -> None:
    with pytest.raises(PolicyError) as info:
        parse_document("kind = 1")
    assert info.value.source == "<document>"
    assert str(info.value).startswith("<document>: kind: ")


ERRORS: list[tuple[str, str, str, str]] = [
    # (name, document, field, a fragment of the message)
    ("no kind", 'name = "x"\nversion = 1\n', "kind", "required key is missing"),
    ("bad kind", 'kind = "rout"\n', "kind", 'found string "rout" (did you mean "route"?)'),
    ("kind type", "kind = 3\n", "kind", "found integer 3"),
    ("unknown top key", ACCESS + 'destnation = "x"\n', "destnation",
     'unknown key (did you mean "destination"?'),
    ("other kind's key", ACCESS + 'service = "x"\n', "service", "unknown key"),
    ("unknown nested key", RESILIENCE + '[timeouts]\nper_tyr = "1s"\n', "timeouts.per_tyr",
     'did you mean "per_try"?'),
    ("unknown key in array table", ROUTE + 'subst = "x"\n', "rule[0].subst",
     'did you mean "subset"?'),
    ("quoted odd key", ACCESS + '"a b" = 1\n', '"a b"', "unknown key"),
    ("missing name", 'kind = "access"\nversion = 1\n', "name", "required key is missing"),
    ("bad name", ACCESS.replace('"web-access"', '"Web"'), "name",
     'lower-case letters, digits, \'.\', \'_\' or \'-\' (at most 63, starting with a letter '
     'or digit), found string "Web"'),
    ("name too long", ACCESS.replace('"web-access"', '"' + "a" * 64 + '"'), "name",
     "at most 63"),
    ("version zero", ACCESS.replace("version = 1", "version = 0"), "version",
     "expected an integer from 1 to 9223372036854775807, found integer 0"),
    ("version string", ACCESS.replace("version = 1", 'version = "1"'), "version",
     'found string "1"'),
    ("version float", ACCESS.replace("version = 1", "version = 1.0"), "version",
     "found float 1.0"),
    ("version bool", ACCESS.replace("version = 1", "version = true"), "version",
     "found boolean true"),
    ("naive expires", ACCESS + "expires = 2030-01-01T00:00:00\n", "expires",
     "found local date-time 2030-01-01T00:00:00 (add \"Z\""),
    ("date expires", ACCESS + "expires = 2030-01-01\n", "expires", "found local date"),
    ("time expires", ACCESS + "expires = 10:00:00\n", "expires", "found local time"),
    ("quoted expires", ACCESS + 'expires = "2030-01-01T00:00:00Z"\n', "expires",
     "without quotes"),
    ("expires before 1970", ACCESS + "expires = 1969-12-31T23:59:59Z\n", "expires",
     "expected a date-time from 1970 to 9999 in UTC, found offset date-time"),
    ("expires after 9999 in UTC", ACCESS + "expires = 9999-12-31T23:59:59-23:59\n", "expires",
     "from 1970 to 9999"),
    ("description type", ACCESS + "description = 5\n", "description",
     "expected a string, found integer 5"),
    ("description length", ACCESS + f'description = "{"x" * 4097}"\n', "description",
     "at most 4096 characters"),
    # route
    ("bad service", ROUTE.replace('service = "web"', 'service = "w b"'), "service",
     'a service name'),
    ("missing service", 'kind = "route"\nname = "r"\nversion = 1\n', "service",
     "required key is missing"),
    ("missing subset", ROUTE.replace('subset = "v1"\nweight = 3', 'subset = "v2"\nweight = 3'),
     "split[0].subset", 'no subset named "v2" (defined: "all", "v1", "canary")'),
    ("rule missing subset", ROUTE.replace('exact = "1" }]\nsubset = "canary"',
                                          'exact = "1" }]\nsubset = "canery"'),
     "rule[0].subset", 'no subset named "canery"'),
    ("all zero", ROUTE.replace("weight = 3", "weight = 0").replace("weight = 1", "weight = 0"),
     "split", "all weights are 0"),
    ("negative weight", ROUTE.replace("weight = 1", "weight = -1"), "split[1].weight",
     "expected an integer from 0 to 1000000, found integer -1"),
    ("float weight", ROUTE.replace("weight = 1", "weight = 0.5"), "split[1].weight",
     "found float 0.5"),
    ("empty split", 'kind = "route"\nname = "r"\nversion = 1\nservice = "w"\nsplit = []\n',
     "split", "expected at least one entry"),
    ("split twice", ROUTE.replace('subset = "canary"\nweight = 1', 'subset = "v1"\nweight = 1'),
     "split[1].subset", 'subset "v1" appears twice'),
    ("split not array", 'kind = "route"\nname = "r"\nversion = 1\nservice = "w"\nsplit = 1\n',
     "split", "expected an array, found integer 1"),
    ("split entry not table", 'kind = "route"\nname = "r"\nversion = 1\nservice = "w"\n'
     "split = [1]\n", "split[0]", "expected a table, found integer 1"),
    ("subset defined twice", ROUTE.replace('name = "canary"\ntags', 'name = "v1"\ntags'),
     "subset[1].name", 'subset "v1" is defined twice'),
    ("subset named all", ROUTE.replace('name = "canary"\ntags', 'name = "all"\ntags'),
     "subset[1].name", "built-in subset"),
    ("empty subset", ROUTE.replace('tags = ["canary", "eu"]', ""), "subset[1]",
     "by version and/or tags"),
    ("bad tag", ROUTE.replace('"eu"]', '"e u"]'), "subset[1].tags[1]", 'found string "e u"'),
    ("tag twice", ROUTE.replace('"eu"]', '"canary"]'), "subset[1].tags[1]", "listed twice"),
    ("bad version", ROUTE.replace('version = "v1"', "version = 1"), "subset[0].version",
     "expected a string, found integer 1"),
    ("rule without headers", ROUTE.replace('headers = [{ name = "X-Canary", exact = "1" }]\n',
                                           ""), "rule[0]", "at least one condition"),
    ("rule with subset and split", ROUTE + 'split = [{ subset = "v1", weight = 1 }]\n',
     "rule[0]", 'exactly one of "subset"'),
    ("rule with neither", ROUTE.replace('exact = "1" }]\nsubset = "canary"\n', 'exact = "1" }]\n'),
     "rule[0]", 'exactly one of "subset"'),
    ("two ops", ROUTE.replace('exact = "1"', 'exact = "1", prefix = "x"'), "rule[0].headers[0]",
     'expected exactly one of "exact", "prefix" or "present", found exact and prefix'),
    ("no op", ROUTE.replace(', exact = "1"', ""), "rule[0].headers[0]", "found none"),
    ("unknown op", ROUTE.replace('exact = "1"', 'regex = "1"'), "rule[0].headers[0].regex",
     "unknown key"),
    ("bad header name", ROUTE.replace('"X-Canary"', '"X Canary"'), "rule[0].headers[0].name",
     "an HTTP header name"),
    ("header value newline", ROUTE.replace('exact = "1"', 'exact = "1\\n"'),
     "rule[0].headers[0].exact", "cannot contain CR, LF or NUL"),
    ("empty prefix", ROUTE.replace('exact = "1"', 'prefix = ""'), "rule[0].headers[0].prefix",
     "non-empty prefix"),
    ("present type", ROUTE.replace('exact = "1"', 'present = "yes"'),
     "rule[0].headers[0].present", 'expected true or false, found string "yes"'),
    ("rule named twice", ROUTE + '[[rule]]\nheaders = [{ name = "a", present = true }]\n'
     'subset = "v1"\nname = "rule[0]"\n', "rule[1].name", "a rule name"),
    ("duplicate rule name", ROUTE.replace("[[rule]]\n", '[[rule]]\nname = "x"\n')
     + '[[rule]]\nname = "x"\nheaders = [{ name = "a", present = true }]\nsubset = "v1"\n',
     "rule[1].name", 'rule "x" is defined twice'),
    # resilience
    ("bad duration", RESILIENCE + '[timeouts]\nconnect = "5x"\n', "timeouts.connect",
     'expected a duration like "250ms", "5s", "1m" or "1h", found string "5x"'),
    ("unitless duration", RESILIENCE + '[timeouts]\nconnect = "5"\n', "timeouts.connect",
     'expected a duration like "250ms", "5s", "1m" or "1h", found string "5"'),
    ("number duration", RESILIENCE + "[timeouts]\nconnect = 5\n", "timeouts.connect",
     'expected a duration string like "250ms", "5s" or "1m", found integer 5'),
    ("zero duration", RESILIENCE + '[timeouts]\noverall = "0s"\n', "timeouts.overall",
     'expected a duration from more than 0s to 1h, found string "0s"'),
    ("long duration", RESILIENCE + '[timeouts]\noverall = "2h"\n', "timeouts.overall",
     "to 1h"),
    ("per try over overall", RESILIENCE + '[timeouts]\nper_try = "20s"\n', "timeouts.per_try",
     "20s is longer than timeouts.overall 15s"),
    ("connect over per try", RESILIENCE + '[timeouts]\nconnect = "3s"\nper_try = "1s"\n',
     "timeouts.connect", "3s is longer than timeouts.per_try 1s"),
    ("connect over default per try", RESILIENCE + '[timeouts]\nconnect = "3s"\n'
     'overall = "1s"\n', "timeouts.connect", "(which defaults to timeouts.overall)"),
    ("attempts range", RESILIENCE + "[retries]\nattempts = 11\n", "retries.attempts",
     "expected an integer from 1 to 10, found integer 11"),
    ("bad condition", RESILIENCE + '[retries]\non = ["500"]\n', "retries.on[0]",
     'expected one of "connect-failure", "502", "503", "504", found string "500"'),
    ("condition twice", RESILIENCE + '[retries]\non = ["503", 503]\n', "retries.on[1]",
     'condition "503" is listed twice'),
    ("no conditions", RESILIENCE + "[retries]\non = []\n", "retries.on",
     "expected at least 1 entry, found 0"),
    ("backoff order", RESILIENCE + '[retries]\nbackoff = "1s"\nmax_backoff = "100ms"\n',
     "retries.max_backoff", "100ms is shorter than retries.backoff 1s"),
    ("ratio range", RESILIENCE + "[retries.budget]\nratio = 1.5\n", "retries.budget.ratio",
     "expected a number from 0 to 1, found float 1.5"),
    ("ratio nan", RESILIENCE + "[retries.budget]\nratio = nan\n", "retries.budget.ratio",
     "found float nan"),
    ("ratio string", RESILIENCE + '[retries.budget]\nratio = "20%"\n', "retries.budget.ratio",
     'found string "20%"'),
    ("budget typo", RESILIENCE + "[retries.budget]\nmin_per_sec = 1\n",
     "retries.budget.min_per_sec", 'did you mean "min_per_second"?'),
    ("window range", RESILIENCE + '[retries.budget]\nwindow = "100ms"\n',
     "retries.budget.window", "expected a duration from 1s to 1m"),
    ("retries not table", RESILIENCE + "retries = 3\n", "retries",
     "expected a table, found integer 3"),
    ("max requests", RESILIENCE + "[circuit_breaker]\nmax_requests = 0\n",
     "circuit_breaker.max_requests", "expected an integer from 1 to 1000000, found integer 0"),
    ("enabled type", RESILIENCE + "[outlier_ejection]\nenabled = 1\n", "outlier_ejection.enabled",
     "expected true or false, found integer 1"),
    ("ejection order", RESILIENCE + '[outlier_ejection]\nbase_ejection_time = "10m"\n'
     'max_ejection_time = "1m"\n', "outlier_ejection.max_ejection_time",
     "1m is shorter than outlier_ejection.base_ejection_time 10m"),
    ("percent range", RESILIENCE + "[outlier_ejection]\nmax_ejected_percent = 101\n",
     "outlier_ejection.max_ejected_percent", "from 0 to 100, found integer 101"),
    # access
    ("bad default", ACCESS.replace('"deny"', '"block"'), "default",
     'expected "allow" or "deny", found string "block"'),
    ("missing default", ACCESS.replace('default = "deny"\n', ""), "default",
     "required key is missing"),
    ("bad source", ACCESS.replace('["api"]', '["api", "a*"]'), "allow[1]",
     'expected a source service name or "*", found string "a*"'),
    ("source twice", ACCESS.replace('["api"]', '["api", "api"]'), "allow[1]", "listed twice"),
    ("allow and deny", ACCESS + 'deny = ["x", "api"]\n', "deny[1]", '"api" is also in allow'),
    ("allow string", ACCESS.replace('["api"]', '"api"'), "allow",
     'expected an array, found string "api"'),
    # trust
    ("trust name", TRUST.replace('name = "trust"', 'name = "keys"'), "name",
     'must be named "trust", found string "keys"'),
    ("threshold high", TRUST.replace("threshold = 2", "threshold = 3"), "threshold",
     "expected an integer from 1 to 2 (the number of keys), found integer 3"),
    ("threshold zero", TRUST.replace("threshold = 2", "threshold = 0"), "threshold",
     "found integer 0"),
    ("missing threshold", TRUST.replace("threshold = 2\n", ""), "threshold",
     "required key is missing"),
    ("no keys", TRUST.replace(f'keys = ["{KEY_A}", "{KEY_B}"]\n', ""), "keys",
     "required key is missing"),
    ("empty keys", TRUST.replace(f'["{KEY_A}", "{KEY_B}"]', "[]"), "keys",
     "expected at least 1 entry"),
    ("duplicate key", TRUST.replace(KEY_B, KEY_A.split()[1]), "keys[1]",
     "key a8ebc03450363429 is listed twice (also keys[0])"),
    ("bad key", TRUST.replace(KEY_B, "not-base64!"), "keys[1]", "public key is not valid base64"),
    ("wrong key id", TRUST.replace("a8ebc03450363429", "0000000000000000"), "keys[0]",
     "does not match the key"),
    ("key type", TRUST.replace(f'"{KEY_B}"', "1"), "keys[1]", "found integer 1"),
]


@pytest.mark.parametrize(("text", "field", "fragment"), [e[1:] for e in ERRORS],
                         ids=[e[0] for e in ERRORS])
def test_precise_errors(text: str, field: str, fragment: str) -> None:
    e = error(text)
    assert e.source == "test.toml"
    assert e.field == field, str(e)
    assert fragment in e.message, str(e)
    assert str(e) == f"test.toml: {field}: {e.message}"


def test_unknown_key_lists_expected_keys() -> None:
    e = error(RESILIENCE + "[circuit_breaker]\nzzz = 1\n")
    assert e.message == "unknown key (expected one of max_requests, max_pending)"


def test_oversized_document_is_rejected_before_parsing() -> None:
    # Invalid UTF-8 and invalid TOML both: only the size may be reported.
    e = error_bytes(b"\xff" * (MAX_DOCUMENT_BYTES + 1))
    assert e.field == ""
    assert e.message == f"document is {MAX_DOCUMENT_BYTES + 1} bytes; the limit is 65536"
    with pytest.raises(PolicyError, match="over 65536 bytes"):
        parse_document("[" * (MAX_DOCUMENT_BYTES * 4))
    # Multi-byte characters count as bytes.
    text = ACCESS + "#" + "é" * ((MAX_DOCUMENT_BYTES - len(ACCESS)) // 2 + 1)
    assert len(text) <= MAX_DOCUMENT_BYTES < len(text.encode())
    with pytest.raises(PolicyError, match=f"document is {len(text.encode())} bytes"):
        parse_document(text)


def test_document_of_exactly_the_limit_parses() -> None:
    text = ACCESS + "#" * (MAX_DOCUMENT_BYTES - len(ACCESS) - 1) + "\n"
    assert len(text.encode()) == MAX_DOCUMENT_BYTES
    assert parse_document(text).name == "web-access"


def error_bytes(data: bytes) -> PolicyError:
    with pytest.raises(PolicyError) as info:
        parse_document(data, source="peer")
    return info.value


def test_non_utf8() -> None:
    e = error_bytes(ACCESS.encode() + b'description = "\xe9"\n')
    assert e.message == f"not valid UTF-8: byte 0xe9 at offset {len(ACCESS) + 15}"
    e = error_bytes(b"\xef\xbb\xbf" + ACCESS.encode())
    assert "byte-order mark" in e.message
    with pytest.raises(PolicyError, match="unpaired surrogate"):
        parse_document(ACCESS + "# \ud800\n")


def test_invalid_toml() -> None:
    e = error_bytes(b'kind = "access"\nname = \n')
    assert e.field == ""
    assert e.message.startswith("invalid TOML: ") and "line 2" in e.message
    e = error_bytes(b'kind = "access"\nkind = "route"\n')
    assert e.message.startswith("invalid TOML: ")


def test_huge_integers_are_errors_not_crashes() -> None:
    head = 'kind = "access"\nname = "a"\n'
    e = error_bytes((head + "version = " + "1" * 5000).encode())
    assert e.message.startswith("invalid TOML: Exceeds the limit (4300 digits)")
    e = error_bytes((head + "version = 0x" + "f" * 5000).encode())
    assert (e.field, e.message) == ("version", "expected an integer from 1 to "
                                    "9223372036854775807, found integer of 20000 bits")


def test_deep_nesting_is_an_error_not_a_crash() -> None:
    e = error_bytes(b"a = " + b"[" * 20000 + b"]" * 20000)
    assert e.message == "invalid TOML: arrays or tables nested too deeply"


def test_bytes_and_str_agree() -> None:
    assert parse_document(ROUTE.encode()) == parse_document(ROUTE)
    assert parse_document(bytearray(ROUTE.encode())) == parse_document(ROUTE)  # type: ignore[arg-type]


# --- durations ---------------------------------------------------------------------


@given(st.integers(min_value=0, max_value=48 * 3600 * 1000))
def test_format_duration_round_trips(ms: int) -> None:
    text = format_duration(ms / 1000)
    assert parse_duration(text) == pytest.approx(ms / 1000, abs=1e-9)
    assert re.fullmatch(r"\d+(ms|s|m|h)", text)


def test_format_duration_examples() -> None:
    assert [format_duration(x) for x in (0.25, 1.5, 5, 60, 90, 3600, 0)] == [
        "250ms", "1500ms", "5s", "1m", "90s", "1h", "0s"]


# --- hostile input -----------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_raise_only_policy_error(data: bytes) -> None:
    with contextlib.suppress(PolicyError):
        parse_document(data)


TOML_CHARS = st.sampled_from(list('kindmeversio =[]{}"\'.,#\n\t-_:01239TZ+ex\\aé*'))


@settings(max_examples=300, deadline=None)
@given(st.text(TOML_CHARS, max_size=200) | st.text(max_size=200))
def test_arbitrary_text_raises_only_policy_error(text: str) -> None:
    with contextlib.suppress(PolicyError):
        parse_document(text)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(KINDS), st.integers(0, 2**32), st.text(max_size=40))
def test_header_prefixes_raise_only_policy_error(kind: str, n: int, tail: str) -> None:
    # Text shaped like a real document, cut off anywhere and continued with junk.
    base = EXAMPLES[kind]
    with contextlib.suppress(PolicyError):
        parse_document(base[: n % (len(base) + 1)] + tail)


KNOWN_KEYS = sorted({k for v in FIELDS.values() for k in v} | set(HEADER_FIELDS))
TOML_SCALARS = (
    st.booleans() | st.integers(min_value=-(2**64), max_value=2**64)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20)
    | st.sampled_from(["web", "v1", "all", "*", "canary", "stable", "1s", "0ms", "allow",
                       "deny", "trust", "connect-failure", "503", KEY_A, "x-canary"])
    | st.datetimes(timezones=st.none() | st.just(UTC)) | st.dates() | st.times()
    | st.builds(pow, st.just(16), st.just(5000))  # too long for str(): 6021 digits
)
TOML_VALUES = st.recursive(
    TOML_SCALARS,
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.sampled_from([*KNOWN_KEYS, "zz"]), inner, max_size=4),
    max_leaves=12,
)


def _mutate(table: Any, data: st.DataObject, top: bool = False) -> Any:
    """Replace, drop or add one value somewhere inside a parsed example. The header is
    mostly left alone at the top, since its errors would hide everything below."""
    if isinstance(table, dict) and table:
        keys = sorted(table)
        if top and data.draw(st.integers(0, 4)):
            keys = [k for k in keys if k not in HEADER_FIELDS] or keys
        key = data.draw(st.sampled_from(keys))
        action = data.draw(st.sampled_from(["descend", "descend", "replace", "drop", "add"]))
        out = dict(table)
        if action == "descend":
            out[key] = _mutate(table[key], data)
        elif action == "replace":
            out[key] = data.draw(TOML_VALUES)
        elif action == "drop":
            del out[key]
        else:
            new_key = data.draw(st.sampled_from(KNOWN_KEYS) | st.text(max_size=8))
            out[new_key] = data.draw(TOML_VALUES)
        return out
    if isinstance(table, list) and table:
        i = data.draw(st.integers(0, len(table) - 1))
        out_list = list(table)
        out_list[i] = _mutate(table[i], data)
        return out_list
    return data.draw(TOML_VALUES)


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(KINDS), st.data())
def test_mutated_tables_raise_only_policy_error(kind: str, data: st.DataObject) -> None:
    table = tomllib.loads(EXAMPLES[kind])
    for _ in range(data.draw(st.integers(1, 3))):
        table = _mutate(table, data, top=True)
    try:
        doc = document_from_table(table)
    except PolicyError as e:
        assert e.message and str(e).startswith("<document>: ")
    else:
        assert doc.kind in KINDS
        doc.to_json()


def test_value_types_in_messages() -> None:
    table = tomllib.loads(ACCESS)
    for value, shown in [(date(2030, 1, 1), "local date 2030-01-01"),
                         (time(1, 2), "local time 01:02:00"),
                         ([1, 2], "array of 2"), ({"a": 1}, "table"),
                         (2.5, "float 2.5"), (10**40, "integer of 133 bits")]:
        with pytest.raises(PolicyError) as info:
            document_from_table({**table, "default": value})
        assert info.value.message == f"expected a string, found {shown}"
    with pytest.raises(PolicyError) as info:
        document_from_table({**table, "default": "x" * 100})
    assert info.value.message.endswith('found string "' + "x" * 55 + '..."')


# --- the traffic features of issue 28 ----------------------------------------------

FAULT = """\
kind = "fault"
name = "web-fault"
version = 1
expires = 2030-01-01T00:00:00Z
service = "web"

[[rule]]
name = "slow"
delay = { duration = "100ms", percent = 50.0 }
"""

RATELIMIT = """\
kind = "ratelimit"
name = "web-limit"
version = 1
service = "web"
requests_per_second = 100
"""

RULE_HEAD = """\
kind = "route"
name = "r"
version = 1
service = "web"
[[rule]]
subset = "all"
"""


def rule_doc(body: str) -> str:
    """A route whose one rule (to subset "all") has ``body`` (TOML lines; a
    [rule.request_headers] table goes last)."""
    return RULE_HEAD + textwrap.dedent(body)


NEW_ERRORS: list[tuple[str, str, str, str]] = [
    # resilience: balancer, hash, slow start
    ("balancer typo", RESILIENCE + 'balancer = "peak-ewma"\n', "balancer",
     'found string "peak-ewma" (did you mean "peak_ewma"?)'),
    ("balancer unknown", RESILIENCE + 'balancer = "fastest"\n', "balancer",
     'expected one of "peak_ewma", "least_request", "round_robin", "random", "hash"'),
    ("balancer type", RESILIENCE + "balancer = 1\n", "balancer",
     "expected a string, found integer 1"),
    ("hash missing", RESILIENCE + 'balancer = "hash"\n', "hash",
     'required when balancer = "hash"'),
    ("hash without hash balancer", RESILIENCE + '[hash]\nheader = "x-user"\n', "hash",
     '[hash] applies only to balancer = "hash"'),
    ("hash with explicit other balancer", RESILIENCE + 'balancer = "random"\n'
     '[hash]\ncookie = "s"\n', "hash", 'this document chooses "random"'),
    ("hash both", RESILIENCE + 'balancer = "hash"\n[hash]\nheader = "x"\ncookie = "y"\n',
     "hash", 'expected exactly one of "header" or "cookie", found both'),
    ("hash none", RESILIENCE + 'balancer = "hash"\n[hash]\n', "hash", "found none"),
    ("hash bad header", RESILIENCE + 'balancer = "hash"\n[hash]\nheader = "x user"\n',
     "hash.header", "an HTTP header name"),
    ("hash bad cookie", RESILIENCE + 'balancer = "hash"\n[hash]\ncookie = "a;b"\n',
     "hash.cookie", "a cookie name"),
    ("hash typo", RESILIENCE + 'balancer = "hash"\n[hash]\nheadr = "x"\n', "hash.headr",
     'did you mean "header"?'),
    ("hash not table", RESILIENCE + 'balancer = "hash"\nhash = "x-user"\n', "hash",
     'expected a table, found string "x-user"'),
    ("slow start long", RESILIENCE + '[slow_start]\nwindow = "11m"\n', "slow_start.window",
     "expected a duration from 0s to 10m"),
    ("slow start unitless", RESILIENCE + '[slow_start]\nwindow = "10"\n', "slow_start.window",
     "expected a duration like"),
    ("aggression zero", RESILIENCE + "[slow_start]\naggression = 0\n",
     "slow_start.aggression", "expected a number more than 0 and at most 10, found integer 0"),
    ("aggression high", RESILIENCE + "[slow_start]\naggression = 10.5\n",
     "slow_start.aggression", "found float 10.5"),
    ("aggression nan", RESILIENCE + "[slow_start]\naggression = nan\n",
     "slow_start.aggression", "found float nan"),
    ("min percent zero", RESILIENCE + "[slow_start]\nmin_percent = 0\n",
     "slow_start.min_percent", "more than 0 and at most 100, found integer 0"),
    ("min percent high", RESILIENCE + "[slow_start]\nmin_percent = 101\n",
     "slow_start.min_percent", "found integer 101"),
    ("slow start typo", RESILIENCE + '[slow_start]\nwindw = "1s"\n', "slow_start.windw",
     'did you mean "window"?'),
    # route: path, method, query
    ("path not table", rule_doc('path = "/a"\n'), "rule[0].path",
     'expected a table, found string "/a"'),
    ("path both", rule_doc('path = { exact = "/a", prefix = "/a" }\n'), "rule[0].path",
     'expected exactly one of "exact" or "prefix", found exact and prefix'),
    ("path none", rule_doc("path = {}\n"), "rule[0].path", "found none"),
    ("path regex", rule_doc('path = { regex = "/a.*" }\n'), "rule[0].path.regex",
     "unknown key"),
    ("path relative", rule_doc('path = { prefix = "api" }\n'), "rule[0].path.prefix",
     'expected a path starting with "/", found string "api"'),
    ("path empty", rule_doc('path = { exact = "" }\n'), "rule[0].path.exact",
     'starting with "/"'),
    ("path with query", rule_doc('path = { exact = "/a?b=1" }\n'), "rule[0].path.exact",
     "no query, fragment, space or control character"),
    ("path with space", rule_doc('path = { prefix = "/a b" }\n'), "rule[0].path.prefix",
     "no query"),
    ("path with newline", rule_doc('path = { prefix = "/a\\n" }\n'), "rule[0].path.prefix",
     "control character"),
    ("path double slash", rule_doc('path = { prefix = "/a//b" }\n'), "rule[0].path.prefix",
     'cannot contain "//"'),
    ("path type", rule_doc("path = { exact = 1 }\n"), "rule[0].path.exact",
     "expected a string, found integer 1"),
    ("path too long", rule_doc(f'path = {{ exact = "/{"a" * 1024}" }}\n'),
     "rule[0].path.exact", "at most 1024 characters"),
    ("method bad", rule_doc('method = "GE T"\n'), "rule[0].method",
     'expected an HTTP method like "GET"'),
    ("method type", rule_doc("method = 1\n"), "rule[0].method", "found integer 1"),
    ("method list entry", rule_doc('method = ["GET", 1]\n'), "rule[0].method[1]",
     "found integer 1"),
    ("method twice", rule_doc('method = ["GET", "get"]\n'), "rule[0].method[1]",
     'method "GET" is listed twice'),
    ("method empty", rule_doc("method = []\n"), "rule[0].method",
     "expected at least 1 entry, found 0"),
    ("method many", rule_doc("method = [" + ", ".join(f'"M{i}"' for i in range(17)) + "]\n"),
     "rule[0].method", "at most 16 entries"),
    ("query no op", rule_doc('query = [{ name = "a" }]\n'), "rule[0].query[0]",
     'expected exactly one of "exact" or "present", found none'),
    ("query two ops", rule_doc('query = [{ name = "a", exact = "1", present = true }]\n'),
     "rule[0].query[0]", "found exact and present"),
    ("query prefix", rule_doc('query = [{ name = "a", prefix = "1" }]\n'),
     "rule[0].query[0].prefix", "unknown key"),
    ("query bad name", rule_doc('query = [{ name = "a b", present = true }]\n'),
     "rule[0].query[0].name", "a query parameter name"),
    ("query name with =", rule_doc('query = [{ name = "a=b", present = true }]\n'),
     "rule[0].query[0].name", "a query parameter name"),
    ("query missing name", rule_doc('query = [{ exact = "1" }]\n'), "rule[0].query[0].name",
     "required key is missing"),
    ("query value newline", rule_doc('query = [{ name = "a", exact = "1\\r" }]\n'),
     "rule[0].query[0].exact", "cannot contain CR, LF or NUL"),
    ("query present type", rule_doc('query = [{ name = "a", present = 1 }]\n'),
     "rule[0].query[0].present", "expected true or false"),
    ("query not array", rule_doc('query = { name = "a", present = true }\n'), "rule[0].query",
     "expected an array, found table"),
    ("rule without any condition", RULE_HEAD, "rule[0]",
     'expected at least one condition ("path", "method", "query" or "headers"'),
    ("rule with only edits", rule_doc('[rule.request_headers]\nset = { "x-a" = "1" }\n'),
     "rule[0]", "at least one condition"),
    # route: request header edits
    ("edits typo", rule_doc('method = "GET"\n[rule.request_headers]\nappend = {}\n'),
     "rule[0].request_headers.append", "unknown key (expected one of set, add, remove)"),
    ("edits not table", rule_doc('method = "GET"\nrequest_headers = ["x"]\n'),
     "rule[0].request_headers", "expected a table, found array of 1"),
    ("set not table", rule_doc('method = "GET"\n[rule.request_headers]\nset = ["x-a"]\n'),
     "rule[0].request_headers.set", "expected a table of header names and values"),
    ("set mesh header", rule_doc('method = "GET"\n[rule.request_headers]\n'
                                 'set = { "x-rumor-source" = "admin" }\n'),
     "rule[0].request_headers.set.x-rumor-source", "is a mesh header (x-rumor-*)"),
    ("add mesh header", rule_doc('method = "GET"\n[rule.request_headers]\n'
                                 'add = { "x-rumor-trace" = "1" }\n'),
     "rule[0].request_headers.add.x-rumor-trace", "mesh header"),
    ("remove mesh header", rule_doc('method = "GET"\n[rule.request_headers]\n'
                                    'remove = ["x-rumor-source"]\n'),
     "rule[0].request_headers.remove[0]", "mesh header"),
    ("set host", rule_doc('method = "GET"\n[rule.request_headers]\nset = { host = "evil" }\n'),
     "rule[0].request_headers.set.host", "frames or addresses the request"),
    ("set content-length", rule_doc('method = "GET"\n[rule.request_headers]\n'
                                    'set = { "content-length" = "0" }\n'),
     "rule[0].request_headers.set.content-length", "frames or addresses"),
    ("add transfer-encoding", rule_doc('method = "GET"\n[rule.request_headers]\n'
                                       'add = { "transfer-encoding" = "chunked" }\n'),
     "rule[0].request_headers.add.transfer-encoding", "frames or addresses"),
    ("remove connection", rule_doc('method = "GET"\n[rule.request_headers]\n'
                                   'remove = ["connection"]\n'),
     "rule[0].request_headers.remove[0]", "hop-by-hop"),
    ("set upgrade", rule_doc('method = "GET"\n[rule.request_headers]\n'
                             'set = { upgrade = "h2c" }\n'),
     "rule[0].request_headers.set.upgrade", "frames or addresses"),
    ("set te", rule_doc('method = "GET"\n[rule.request_headers]\nset = { te = "trailers" }\n'),
     "rule[0].request_headers.set.te", "frames or addresses"),
    ("upper-case name", rule_doc('method = "GET"\n[rule.request_headers]\n'
                                 'set = { "X-Env" = "1" }\n'),
     "rule[0].request_headers.set.X-Env", 'expected a lower-case header name, found string '
     '"X-Env" (write "x-env")'),
    ("name not a token", rule_doc('method = "GET"\n[rule.request_headers]\n'
                                  'set = { "x env" = "1" }\n'),
     'rule[0].request_headers.set."x env"', "an HTTP header name"),
    ("name with colon", rule_doc('method = "GET"\n[rule.request_headers]\n'
                                 'add = { "x-a:" = "1" }\n'),
     'rule[0].request_headers.add."x-a:"', "an HTTP header name"),
    ("remove not a token", rule_doc('method = "GET"\n[rule.request_headers]\n'
                                    'remove = ["x\\r\\ny"]\n'),
     "rule[0].request_headers.remove[0]", "an HTTP header name"),
    ("remove type", rule_doc('method = "GET"\n[rule.request_headers]\nremove = [1]\n'),
     "rule[0].request_headers.remove[0]", "found integer 1"),
    ("value crlf", rule_doc('method = "GET"\n[rule.request_headers]\n'
                            'set = { "x-a" = "1\\r\\nx-rumor-source: admin" }\n'),
     "rule[0].request_headers.set.x-a", "cannot contain CR, LF or NUL"),
    ("value nul", rule_doc('method = "GET"\n[rule.request_headers]\n'
                           'add = { "x-a" = "1\\u0000" }\n'),
     "rule[0].request_headers.add.x-a", "cannot contain CR, LF or NUL"),
    ("value control", rule_doc('method = "GET"\n[rule.request_headers]\n'
                               'set = { "x-a" = "1\\u0001" }\n'),
     "rule[0].request_headers.set.x-a", "control character 0x01"),
    ("value del", rule_doc('method = "GET"\n[rule.request_headers]\n'
                           'set = { "x-a" = "1\\u007f" }\n'),
     "rule[0].request_headers.set.x-a", "control character 0x7f"),
    ("value non-ascii", rule_doc('method = "GET"\n[rule.request_headers]\n'
                                 'set = { "x-a" = "é" }\n'),
     "rule[0].request_headers.set.x-a", "expected an ASCII header value"),
    ("value padded", rule_doc('method = "GET"\n[rule.request_headers]\n'
                              'set = { "x-a" = " 1" }\n'),
     "rule[0].request_headers.set.x-a", "cannot start or end with whitespace"),
    ("value too long", rule_doc('method = "GET"\n[rule.request_headers]\n'
                                f'set = {{ "x-a" = "{"v" * 1025}" }}\n'),
     "rule[0].request_headers.set.x-a", "expected at most 1024 characters, found 1025"),
    ("value type", rule_doc('method = "GET"\n[rule.request_headers]\nset = { "x-a" = 1 }\n'),
     "rule[0].request_headers.set.x-a", "expected a string, found integer 1"),
    ("set and remove", rule_doc('method = "GET"\n[rule.request_headers]\n'
                                'set = { "x-a" = "1" }\nremove = ["x-a"]\n'),
     "rule[0].request_headers.remove[0]", 'header "x-a" is also in set'),
    ("set and add", rule_doc('method = "GET"\n[rule.request_headers]\n'
                             'set = { "x-a" = "1" }\nadd = { "x-a" = "2" }\n'),
     "rule[0].request_headers.add.x-a", 'header "x-a" is also in set'),
    ("remove twice", rule_doc('method = "GET"\n[rule.request_headers]\n'
                              'remove = ["x-a", "x-a"]\n'),
     "rule[0].request_headers.remove[1]", 'is also in remove'),
    ("too many edits", rule_doc('method = "GET"\n[rule.request_headers]\nset = {'
                                + ", ".join(f'"x-{i}" = "1"' for i in range(17)) + "}\n"),
     "rule[0].request_headers.set", "expected at most 16 headers, found 17"),
    # fault
    ("fault without expires", FAULT.replace("expires = 2030-01-01T00:00:00Z\n", ""),
     "expires", "required for a fault document"),
    ("fault without service", FAULT.replace('service = "web"\n', ""), "service",
     "required key is missing"),
    ("fault without rules", FAULT[:FAULT.index("[[rule]]")], "rule",
     "required key is missing"),
    ("fault empty rules", FAULT[:FAULT.index("[[rule]]")] + "rule = []\n", "rule",
     "expected at least 1 entry, found 0"),
    ("fault rule without fault", FAULT.replace('delay = { duration = "100ms", percent = 50.0 }',
                                               ""), "rule[0]", 'expected "delay", "abort" or both'),
    ("fault delay long", FAULT.replace('"100ms"', '"61s"'), "rule[0].delay.duration",
     "expected a duration from more than 0s to 1m"),
    ("fault delay zero", FAULT.replace('"100ms"', '"0s"'), "rule[0].delay.duration",
     "from more than 0s"),
    ("fault delay missing duration", FAULT.replace('duration = "100ms", ', ""),
     "rule[0].delay.duration", "required key is missing"),
    ("fault delay missing percent", FAULT.replace(", percent = 50.0", ""),
     "rule[0].delay.percent", "required key is missing"),
    ("fault percent zero", FAULT.replace("50.0", "0.0"), "rule[0].delay.percent",
     "expected a number more than 0 and at most 100, found float 0.0"),
    ("fault percent high", FAULT.replace("50.0", "100.5"), "rule[0].delay.percent",
     "found float 100.5"),
    ("fault percent string", FAULT.replace("50.0", '"50%"'), "rule[0].delay.percent",
     'found string "50%"'),
    ("fault delay typo", FAULT.replace("percent = 50.0", "percent = 50.0, jitter = \"1s\""),
     "rule[0].delay.jitter", "unknown key"),
    ("abort status low", FAULT + "abort = { status = 399, percent = 1.0 }\n",
     "rule[0].abort.status", "expected an integer from 400 to 599, found integer 399"),
    ("abort status high", FAULT + "abort = { status = 600, percent = 1.0 }\n",
     "rule[0].abort.status", "found integer 600"),
    ("abort status string", FAULT + 'abort = { status = "503", percent = 1.0 }\n',
     "rule[0].abort.status", 'found string "503"'),
    ("abort both", FAULT + "abort = { status = 503, reset = true, percent = 1.0 }\n",
     "rule[0].abort", 'expected exactly one of "status"'),
    ("abort none", FAULT + "abort = { percent = 1.0 }\n", "rule[0].abort", "found none"),
    ("abort reset false", FAULT + "abort = { reset = false, percent = 1.0 }\n",
     "rule[0].abort.reset", "expected true"),
    ("abort reset type", FAULT + 'abort = { reset = "yes", percent = 1.0 }\n',
     "rule[0].abort.reset", "expected true or false"),
    ("abort missing percent", FAULT + "abort = { status = 503 }\n", "rule[0].abort.percent",
     "required key is missing"),
    ("fault sources bad", FAULT + 'sources = ["a b"]\n', "rule[0].sources[0]",
     'expected a source service name, found string "a b"'),
    ("fault sources star", FAULT + 'sources = ["*"]\n', "rule[0].sources[0]",
     "expected a source service name"),
    ("fault sources twice", FAULT + 'sources = ["api", "api"]\n', "rule[0].sources[1]",
     '"api" is listed twice'),
    ("fault sources string", FAULT + 'sources = "api"\n', "rule[0].sources",
     "expected an array"),
    ("fault headers no op", FAULT + 'headers = [{ name = "x-a" }]\n', "rule[0].headers[0]",
     'expected exactly one of "exact", "prefix" or "present", found none'),
    ("fault headers bad name", FAULT + 'headers = [{ name = "x a", present = true }]\n',
     "rule[0].headers[0].name", "an HTTP header name"),
    ("fault route rule", FAULT + 'route_rule = "Canary"\n', "rule[0].route_rule",
     "the name of a rule of the service's route document"),
    ("fault rule twice", FAULT + FAULT[FAULT.index("[[rule]]"):], "rule[1].name",
     'rule "slow" is defined twice'),
    ("fault unknown rule key", FAULT + 'sleep = "1s"\n', "rule[0].sleep", "unknown key"),
    ("fault unknown top key", FAULT.replace('service = "web"', 'service = "web"\nrules = []'),
     "rules", 'did you mean "rule"?'),
    # ratelimit
    ("rate zero", RATELIMIT.replace("= 100", "= 0"), "requests_per_second",
     "expected a number more than 0 and at most 10000000, found integer 0"),
    ("rate high", RATELIMIT.replace("= 100", "= 1e8"), "requests_per_second",
     "found float 100000000.0"),
    ("rate string", RATELIMIT.replace("= 100", '= "100/s"'), "requests_per_second",
     'found string "100/s"'),
    ("rate inf", RATELIMIT.replace("= 100", "= inf"), "requests_per_second", "found float inf"),
    ("rate missing", RATELIMIT.replace("requests_per_second = 100\n", ""),
     "requests_per_second", "required key is missing (it may be left out only when "
     "[[source]] limits are given)"),
    ("burst zero", RATELIMIT + 'burst = "0s"\n', "burst",
     "expected a duration from more than 0s to 1m"),
    ("burst long", RATELIMIT + 'burst = "2m"\n', "burst", "to 1m"),
    ("burst number", RATELIMIT + "burst = 1\n", "burst", "expected a duration string"),
    ("source bad name", RATELIMIT + '[[source]]\nname = "a b"\nrequests_per_second = 1\n',
     "source[0].name", "a service name"),
    ("source twice", RATELIMIT + '[[source]]\nname = "a"\nrequests_per_second = 1\n'
     '[[source]]\nname = "a"\nrequests_per_second = 2\n', "source[1].name",
     'source "a" is listed twice'),
    ("source missing rate", RATELIMIT + '[[source]]\nname = "a"\n',
     "source[0].requests_per_second", "required key is missing"),
    ("source rate zero", RATELIMIT + '[[source]]\nname = "a"\nrequests_per_second = 0\n',
     "source[0].requests_per_second", "more than 0"),
    ("source typo", RATELIMIT + '[[source]]\nname = "a"\nrate = 1\n', "source[0].rate",
     "unknown key"),
    ("ratelimit typo", RATELIMIT + "requests_per_minute = 1\n", "requests_per_minute",
     'did you mean "requests_per_second"?'),
]


@pytest.mark.parametrize(("text", "field", "fragment"), [e[1:] for e in NEW_ERRORS],
                         ids=[e[0] for e in NEW_ERRORS])
def test_precise_errors_of_the_traffic_features(text: str, field: str, fragment: str) -> None:
    e = error(text)
    assert e.source == "test.toml"
    assert e.field == field, str(e)
    assert fragment in e.message, str(e)


def test_balancer_hash_and_slow_start_parse() -> None:
    from rumor.policy.documents import DEFAULT_BALANCER_SPEC, BalancerSpec, HashOn, SlowStart

    spec = parse(RESILIENCE).spec
    assert isinstance(spec, ResilienceSpec) and spec.balancer == DEFAULT_BALANCER_SPEC
    assert spec.balancer.algorithm == "peak_ewma"
    assert spec.balancer.slow_start == SlowStart(10.0, 1.0, 10.0)
    spec = parse(RESILIENCE + 'balancer = "hash"\n[hash]\nheader = "X-User"\n'
                 '[slow_start]\nwindow = "0s"\naggression = 2\nmin_percent = 100\n').spec
    assert isinstance(spec, ResilienceSpec)
    assert spec.balancer == BalancerSpec("hash", HashOn(header="x-user"), SlowStart(0.0, 2.0,
                                                                                    100.0))
    spec = parse(RESILIENCE + 'balancer = "hash"\nhash = { cookie = "Session" }\n').spec
    assert isinstance(spec, ResilienceSpec)
    assert spec.balancer.hash_on == HashOn(cookie="Session")  # cookie names keep their case
    assert spec.balancer.to_json()["hash"] == {"cookie": "Session"}
    for name in ("least_request", "round_robin", "random"):
        spec = parse(RESILIENCE + f'balancer = "{name}"\n').spec
        assert isinstance(spec, ResilienceSpec) and spec.balancer.algorithm == name
        assert spec.balancer.hash_on is None


def test_route_rule_conditions_and_edits_parse() -> None:
    from rumor.policy.documents import HeaderEdits, PathMatch, QueryMatch

    spec = parse(rule_doc('''\
        path = { prefix = "/api/" }
        method = ["get", "HEAD"]
        query = [{ name = "debug", exact = "1" }, { name = "x", present = false }]
        [rule.request_headers]
        set = { "x-env" = "canary" }
        add = { "x-tag" = "a b" }
        remove = ["x-debug-token", "cookie"]
        ''')).spec
    assert isinstance(spec, RouteSpec)
    (rule,) = spec.rules
    assert rule.path == PathMatch("prefix", "/api")  # the trailing "/" is dropped
    assert rule.methods == ("GET", "HEAD")
    assert rule.query == (QueryMatch("debug", "exact", "1"), QueryMatch("x", "absent"))
    assert rule.headers == ()
    assert rule.request_headers == HeaderEdits((("x-env", "canary"),), (("x-tag", "a b"),),
                                               ("x-debug-token", "cookie"))
    one = parse(rule_doc('method = "PATCH"\npath = { exact = "/a/" }\n')).spec
    assert isinstance(one, RouteSpec)
    assert one.rules[0].methods == ("PATCH",)
    assert one.rules[0].path == PathMatch("exact", "/a/")  # exact keeps it
    root = parse(rule_doc('path = { prefix = "/" }\n')).spec
    assert isinstance(root, RouteSpec) and root.rules[0].path == PathMatch("prefix", "/")
    plain = parse(ROUTE).spec
    assert isinstance(plain, RouteSpec)
    assert plain.rules[0].path is None and plain.rules[0].methods == ()
    assert not plain.rules[0].request_headers


def test_fault_parses() -> None:
    from rumor.policy.documents import FaultAbort, FaultDelay, FaultSpec

    doc = parse(FAULT + 'sources = ["checkout"]\nheaders = [{ name = "X-Fault", exact = "1" }]\n'
                'route_rule = "canary"\nabort = { reset = true, percent = 5 }\n'
                '[[rule]]\nabort = { status = 503, percent = 100 }\n')
    assert doc.kind == "fault" and doc.service == "web"
    assert doc.expires == datetime(2030, 1, 1, tzinfo=UTC).timestamp()
    spec = doc.spec
    assert isinstance(spec, FaultSpec)
    first, second = spec.rules
    assert (first.name, first.sources, first.route_rule) == ("slow", ("checkout",), "canary")
    assert first.headers == (HeaderMatch("x-fault", "exact", "1"),)
    assert first.delay == FaultDelay(0.1, 50.0)
    assert first.abort == FaultAbort(None, 5.0)
    assert second.name == "rule[1]" and second.delay is None
    assert second.abort == FaultAbort(503, 100.0)
    assert doc.to_json()["spec"]["rules"][0]["abort"] == {"reset": True, "percent": 5.0}


def test_ratelimit_parses() -> None:
    from rumor.policy.documents import RateLimitSpec, SourceLimit

    spec = parse(RATELIMIT).spec
    assert spec == RateLimitSpec("web", 100.0, 1.0, ())
    spec = parse(RATELIMIT.replace("requests_per_second = 100\n", "")
                 + 'burst = "250ms"\n[[source]]\nname = "batch"\nrequests_per_second = 2.5\n'
                 '[[source]]\nname = "api"\nrequests_per_second = 1e7\n').spec
    assert spec == RateLimitSpec("web", None, 0.25, (SourceLimit("batch", 2.5),
                                                     SourceLimit("api", 1e7)))


def test_required_release() -> None:
    from dataclasses import replace

    from rumor.policy.documents import RouteRule, document_features, required_release

    assert required_release(parse(ROUTE)) is None
    assert required_release(parse(RESILIENCE)) is None
    assert required_release(parse(ACCESS)) is None
    assert required_release(parse(TRUST)) is None
    assert required_release(parse(FAULT)) == "0.2.0"
    assert required_release(parse(RATELIMIT)) == "0.2.0"
    # An explicit default is still a key an older parser refuses.
    explicit = parse(RESILIENCE + 'balancer = "peak_ewma"\n')
    assert document_features(explicit) == {"resilience.balancer"}
    assert required_release(explicit) == "0.2.0"
    assert document_features(parse(RESILIENCE + '[slow_start]\nwindow = "10s"\n')) == {
        "resilience.slow_start"}
    assert document_features(parse(RESILIENCE + 'balancer = "hash"\nhash = { header = "x" }'
                                   "\n")) == {"resilience.balancer", "resilience.hash"}
    assert document_features(parse(rule_doc('method = "GET"\n'))) == {"route.rule.method"}
    assert document_features(parse(rule_doc('path = { exact = "/" }\n'))) == {
        "route.rule.path"}
    assert document_features(parse(rule_doc('query = [{ name = "a", present = true }]\n'))) \
        == {"route.rule.query"}
    assert document_features(parse(rule_doc(
        'method = "GET"\n[rule.request_headers]\nremove = ["x-a"]\n'))) == {
        "route.rule.method", "route.rule.request_headers"}
    assert document_features(parse(EXAMPLES["route"])) == {
        "route.rule.path", "route.rule.method", "route.rule.query",
        "route.rule.request_headers"}
    # A document built in code (no parser record) is judged by its values.
    route = parse(ROUTE)
    assert isinstance(route.spec, RouteSpec)
    rule = route.spec.rules[0]
    built = replace(route, spec=replace(route.spec, rules=(replace(rule, methods=("GET",)),)))
    assert built.features == frozenset() and required_release(built) == "0.2.0"
    assert isinstance(rule, RouteRule)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(["fault", "ratelimit", "route", "resilience"]), st.data())
def test_mutated_new_kinds_raise_only_policy_error(kind: str, data: st.DataObject) -> None:
    table = tomllib.loads(EXAMPLES[kind])
    for _ in range(data.draw(st.integers(1, 4))):
        table = _mutate(table, data, top=True)
    try:
        doc = document_from_table(table)
    except PolicyError as e:
        assert e.message and str(e).startswith("<document>: ")
    else:
        assert doc.kind == kind
        doc.to_json()


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=12), st.text(max_size=20),
       st.sampled_from(["set", "add", "remove"]))
def test_hostile_header_edits_are_refused_or_safe(name: str, value: str, where: str) -> None:
    from rumor.policy.documents import PROTECTED_HEADERS

    table = tomllib.loads(rule_doc('method = "GET"\n'))
    edit: dict[str, Any] = {"remove": [name]} if where == "remove" else {where: {name: value}}
    table["rule"][0]["request_headers"] = edit
    try:
        doc = document_from_table(table)
    except PolicyError as e:
        assert e.field.startswith("rule[0].request_headers")
        return
    assert isinstance(doc.spec, RouteSpec)
    edits = doc.spec.rules[0].request_headers
    for n in edits.names():
        assert re.fullmatch(r"[!#$%&'*+.^_`|~0-9a-z-]+", n)
        assert n not in PROTECTED_HEADERS and not n.startswith("x-rumor-")
    for _, v in edits.set + edits.add:
        assert v.isascii() and not any(ord(c) < 0x20 and c != "\t" for c in v)
        assert len(v) <= 1024 and "\x7f" not in v
        v.encode("latin-1")


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(["fault", "ratelimit"]), st.integers(0, 2**32),
       st.text(TOML_CHARS, max_size=60))
def test_new_kinds_cut_and_continued_raise_only_policy_error(kind: str, n: int,
                                                             tail: str) -> None:
    base = EXAMPLES[kind]
    with contextlib.suppress(PolicyError):
        parse_document(base[: n % (len(base) + 1)] + tail)


# --- gRPC statuses a retry may be taken on (issue 32) ----------------------------------


def test_grpc_on_default_and_given() -> None:
    from rumor.policy.documents import document_features, required_release

    spec = parse(RESILIENCE).spec
    assert isinstance(spec, ResilienceSpec)
    assert spec.retries.grpc_on == ("unavailable",)
    assert "resilience.retries.grpc_on" not in document_features(parse(RESILIENCE))
    doc = parse(RESILIENCE + '[retries]\ngrpc_on = ["unavailable", "resource-exhausted"]\n')
    assert isinstance(doc.spec, ResilienceSpec)
    assert doc.spec.retries.grpc_on == ("unavailable", "resource-exhausted")
    assert doc.spec.retries.to_json()["grpc_on"] == ["unavailable", "resource-exhausted"]
    # An older agent's parser rejects the key: the document needs 0.3.0.
    assert document_features(doc) == {"resilience.retries.grpc_on"}
    assert required_release(doc) == "0.3.0"
    # An empty list: no gRPC status is retried.
    none = parse(RESILIENCE + "[retries]\ngrpc_on = []\n").spec
    assert isinstance(none, ResilienceSpec)
    assert none.retries.grpc_on == ()


@pytest.mark.parametrize(("text", "field", "fragment"), [
    (RESILIENCE + '[retries]\ngrpc_on = ["UNAVAILABLE"]\n', "retries.grpc_on[0]",
     'expected one of "cancelled", "unknown", "deadline-exceeded"'),
    (RESILIENCE + '[retries]\ngrpc_on = [14]\n', "retries.grpc_on[0]", "found integer 14"),
    (RESILIENCE + '[retries]\ngrpc_on = ["aborted", "aborted"]\n', "retries.grpc_on[1]",
     'gRPC status "aborted" is listed twice'),
    (RESILIENCE + '[retries]\ngrpc_on = "unavailable"\n', "retries.grpc_on",
     "expected an array"),
])
def test_grpc_on_errors(text: str, field: str, fragment: str) -> None:
    with pytest.raises(PolicyError) as e:
        parse(text)
    assert field in str(e.value) and fragment in str(e.value)
