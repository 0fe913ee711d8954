"""The TOML parsers of policy documents: the operator's text, checked strictly into
the model of ``documents.py``.

A document is the payload of a signed envelope, so the bytes parsed here are exactly
the bytes that were signed, and every agent parses them the same way. Validation is
strict because a mistake travels to every agent in the mesh: an unknown key is an
error rather than ignored (a typo like ``per_tyr`` must not silently fall back to a
default), values are type- and range-checked, and cross-field rules (a split names
only defined subsets, a try never outlives the whole request) are enforced before a
document is accepted. Every error names the source, the dotted field path
(``split[1].weight``) and what was expected versus what was found.
"""

from __future__ import annotations

import difflib
import json
import re
import tomllib
from collections.abc import Mapping
from datetime import UTC, date, datetime, time
from typing import Any

from rumor.gossip.durations import DurationError, format_duration, parse_duration

from .documents import (
    ALL_INSTANCES,
    ALL_SUBSET,
    BALANCERS,
    DEFAULT_BALANCER,
    DEFAULT_GRPC_ON,
    DEFAULT_SLOW_START,
    FEATURE_RELEASES,
    FIELDS,
    GRPC_RETRY_STATUSES,
    HEADER_FIELDS,
    KINDS,
    MAX_DESCRIPTION,
    MAX_DOCUMENT_BYTES,
    MAX_HEADER_EDITS,
    MAX_HEADER_MATCHES,
    MAX_HEADER_VALUE,
    MAX_METHODS,
    MAX_PATH,
    MAX_QUERY_MATCHES,
    MAX_RULES,
    MAX_SOURCES,
    MAX_SPLIT,
    MAX_SUBSETS,
    MAX_TAGS,
    MAX_TRUST_KEYS,
    MAX_VERSION,
    MAX_WEIGHT,
    MESH_HEADER_PREFIX,
    PROTECTED_HEADERS,
    RETRY_CONDITIONS,
    TRUST_NAME,
    AccessSpec,
    BalancerSpec,
    CircuitBreaker,
    Document,
    FaultAbort,
    FaultDelay,
    FaultRule,
    FaultSpec,
    HashOn,
    HeaderEdits,
    HeaderMatch,
    OutlierEjection,
    PathMatch,
    PolicyError,
    QueryMatch,
    RateLimitSpec,
    ResilienceSpec,
    RetryBudget,
    RetryPolicy,
    RouteRule,
    RouteSpec,
    SlowStart,
    SourceLimit,
    Spec,
    Subset,
    Timeouts,
    TrustSpec,
    WeightedSubset,
)
from .keys import KeyFileError, PublicKey, parse_public_key

# Names match what the catalog accepts for services, versions and tags, so a policy
# can name anything an agent can announce.
_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
_SERVICE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,62}")
_SUBSET = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
_INSTANCE_VERSION = re.compile(r"[A-Za-z0-9_.+-]{1,64}")
_TAG = re.compile(r"[A-Za-z0-9_.:=/+-]{1,64}")
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,128}")  # an RFC 9110 token
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


class _Invalid(Exception):
    """Raised inside validation, before the source is known to the helper."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(field, message)
        self.field = field
        self.message = message



# --- entry points ---------------------------------------------------------------------


def parse_document(data: bytes | str, *, source: str = "<document>") -> Document:
    """Check and parse one policy document (the exact bytes of an envelope's payload).

    The size is checked before anything else so that a hostile peer cannot make an
    agent parse megabytes; then UTF-8, then TOML, then the schema."""
    if isinstance(data, str):
        # A character is at least one byte: a long string is too large before encoding.
        if len(data) > MAX_DOCUMENT_BYTES:
            raise PolicyError(source, "", f"document is over {MAX_DOCUMENT_BYTES} bytes "
                              f"({len(data)} characters)")
        try:
            raw = data.encode("utf-8")
        except UnicodeEncodeError as e:
            raise PolicyError(source, "", f"not valid UTF-8: character {e.start} is an "
                              "unpaired surrogate") from None
    else:
        raw = bytes(data)
    if len(raw) > MAX_DOCUMENT_BYTES:
        raise PolicyError(source, "", f"document is {len(raw)} bytes; the limit is "
                          f"{MAX_DOCUMENT_BYTES}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PolicyError(source, "", f"not valid UTF-8: byte 0x{raw[e.start]:02x} at "
                          f"offset {e.start}") from None
    if text.startswith("\ufeff"):
        raise PolicyError(source, "", "starts with a byte-order mark; save the file as "
                          "UTF-8 without BOM")
    try:
        table = tomllib.loads(text)
    except ValueError as e:
        # TOMLDecodeError, or int() refusing an integer of over 4300 digits.
        raise PolicyError(source, "", f"invalid TOML: {e}") from None
    except RecursionError:
        raise PolicyError(source, "", "invalid TOML: arrays or tables nested too "
                          "deeply") from None
    return document_from_table(table, source=source)


def document_from_table(table: Mapping[str, Any], *, source: str = "<document>") -> Document:
    """Validate an already parsed TOML table. ``parse_document`` is the entry point for
    documents; this one serves tools and tests that hold the table."""
    try:
        return _document(table)
    except _Invalid as e:
        raise PolicyError(source, e.field, e.message) from None


# --- validation -----------------------------------------------------------------------


class _Missing:
    pass


_MISSING = _Missing()


def _show(value: Any) -> str:
    """A value as a message shows it: its TOML type, then the value if short."""
    if isinstance(value, bool):
        return f"boolean {'true' if value else 'false'}"
    if isinstance(value, str):
        text = json.dumps(value, ensure_ascii=False)
        if len(text) > 60:
            text = text[:56] + '..."'
        return f"string {text}"
    if isinstance(value, int):
        # str() of a huge integer is slow, and refused past 4300 digits.
        return f"integer {value}" if abs(value) < 10**30 else \
            f"integer of {value.bit_length()} bits"
    if isinstance(value, float):
        return f"float {value!r}"
    if isinstance(value, datetime):
        what = "offset date-time" if value.tzinfo is not None else "local date-time"
        return f"{what} {value.isoformat()}"
    if isinstance(value, date):
        return f"local date {value.isoformat()}"
    if isinstance(value, time):
        return f"local time {value.isoformat()}"
    if isinstance(value, list | tuple):
        return f"array of {len(value)}"
    if isinstance(value, Mapping):
        return "table"
    return type(value).__name__


def _quote(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def _join(path: str, key: str) -> str:
    part = key if _BARE_KEY.fullmatch(key) else _quote(key)
    return f"{path}.{part}" if path else part


class _Table:
    """One TOML table under validation: knows its path for messages and rejects keys
    it does not expect, suggesting the closest expected key."""

    def __init__(self, value: Any, path: str, allowed: tuple[str, ...]) -> None:
        if not isinstance(value, Mapping):
            raise _Invalid(path, f"expected a table, found {_show(value)}")
        self.data: Mapping[str, Any] = value
        self.path = path
        for key in value:
            if key not in allowed:
                close = difflib.get_close_matches(str(key), allowed, n=1)
                hint = f'did you mean "{close[0]}"? ' if close else ""
                raise _Invalid(_join(path, str(key)), f"unknown key ({hint}expected one of "
                               f"{', '.join(allowed)})")

    def at(self, key: str) -> str:
        return _join(self.path, key)

    def has(self, key: str) -> bool:
        return key in self.data

    def raw(self, key: str, default: Any = _MISSING) -> Any:
        if key in self.data:
            return self.data[key]
        if isinstance(default, _Missing):
            raise _Invalid(self.at(key), "required key is missing")
        return default

    def string(self, key: str, pattern: re.Pattern[str] | None = None, what: str = "",
               default: str | _Missing = _MISSING) -> str:
        value = self.raw(key, default)
        if not isinstance(value, str):
            raise _Invalid(self.at(key), f"expected a string, found {_show(value)}")
        if pattern is not None and not pattern.fullmatch(value):
            raise _Invalid(self.at(key), f"expected {what}, found {_show(value)}")
        return value

    def integer(self, key: str, low: int, high: int, default: int | _Missing = _MISSING,
                what: str = "") -> int:
        value = self.raw(key, default)
        return _integer(value, self.at(key), low, high, what)

    def number(self, key: str, low: float, high: float,
               default: float | _Missing = _MISSING) -> float:
        value = self.raw(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _Invalid(self.at(key), f"expected a number from {low:g} to {high:g}, found "
                           f"{_show(value)}")
        if not (low <= value <= high):  # also false for nan
            raise _Invalid(self.at(key), f"expected a number from {low:g} to {high:g}, found "
                           f"{_show(value)}")
        return float(value)

    def boolean(self, key: str, default: bool) -> bool:
        value = self.raw(key, default)
        if not isinstance(value, bool):
            raise _Invalid(self.at(key), f"expected true or false, found {_show(value)}")
        return value

    def duration(self, key: str, low: float, high: float, default: float) -> float:
        """A duration string from ``low`` to ``high`` seconds (a tiny positive ``low``
        means "more than 0")."""
        if key not in self.data:
            return default
        value = self.data[key]
        field = self.at(key)
        if not isinstance(value, str):
            raise _Invalid(field, 'expected a duration string like "250ms", "5s" or "1m", '
                           f"found {_show(value)}")
        try:
            # A unit is required here: is a bare "5" seconds or milliseconds?
            seconds = parse_duration(value, unit_required=True)
        except DurationError:
            raise _Invalid(field, 'expected a duration like "250ms", "5s", "1m" or "1h", '
                           f"found {_show(value)}") from None
        if not (low <= seconds <= high):
            lower = "more than 0s" if 0 < low < 0.001 else format_duration(low)
            raise _Invalid(field, f"expected a duration from {lower} to "
                           f"{format_duration(high)}, found {_show(value)}")
        return seconds

    def array(self, key: str, max_items: int, min_items: int = 0) -> list[Any]:
        value = self.raw(key, [])
        if not isinstance(value, list):
            raise _Invalid(self.at(key), f"expected an array, found {_show(value)}")
        if len(value) > max_items:
            raise _Invalid(self.at(key), f"expected at most {max_items} entries, found "
                           f"{len(value)}")
        if len(value) < min_items:
            raise _Invalid(self.at(key), f"expected at least {min_items} "
                           f"entr{'y' if min_items == 1 else 'ies'}, found {len(value)}")
        return value

    def tables(self, key: str, allowed: tuple[str, ...], max_items: int) -> list[_Table]:
        items = self.array(key, max_items)
        return [_Table(item, f"{self.at(key)}[{i}]", allowed) for i, item in enumerate(items)]

    def table(self, key: str, allowed: tuple[str, ...]) -> _Table:
        return _Table(self.raw(key, {}), self.at(key), allowed)


def _integer(value: Any, field: str, low: int, high: int, what: str = "") -> int:
    expected = f"an integer from {low} to {high}{what}"
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Invalid(field, f"expected {expected}, found {_show(value)}")
    if not (low <= value <= high):
        raise _Invalid(field, f"expected {expected}, found {_show(value)}")
    return value


def _document(table: Mapping[str, Any]) -> Document:
    if not isinstance(table, Mapping):
        raise _Invalid("", f"expected a table, found {_show(table)}")
    kind_value = table.get("kind", _MISSING)
    if isinstance(kind_value, _Missing):
        raise _Invalid("kind", f"required key is missing (one of {', '.join(KINDS)})")
    if kind_value not in KINDS:
        close = difflib.get_close_matches(kind_value, KINDS, n=1) \
            if isinstance(kind_value, str) else []
        hint = f' (did you mean "{close[0]}"?)' if close else ""
        raise _Invalid("kind", f"expected one of {', '.join(_quote(k) for k in KINDS)}, "
                       f"found {_show(kind_value)}{hint}")
    kind = str(kind_value)
    t = _Table(table, "", HEADER_FIELDS + FIELDS[kind])
    name = t.string("name", _NAME, "a name of lower-case letters, digits, '.', '_' or '-' "
                    "(at most 63, starting with a letter or digit)")
    version = t.integer("version", 1, MAX_VERSION)
    expires = _expires(t)
    description = t.string("description", default="")
    if len(description) > MAX_DESCRIPTION:
        raise _Invalid("description", f"expected at most {MAX_DESCRIPTION} characters, "
                       f"found {len(description)}")
    spec: Spec
    if kind == "route":
        spec = _route(t)
    elif kind == "resilience":
        spec = _resilience(t)
    elif kind == "access":
        spec = _access(t)
    elif kind == "fault":
        spec = _fault(t, expires)
    elif kind == "ratelimit":
        spec = _ratelimit(t)
    else:
        if name != TRUST_NAME:
            # One trust document per mesh: its versions order key rotations.
            raise _Invalid("name", f'a trust document must be named "{TRUST_NAME}", found '
                           f"{_show(name)}")
        spec = _trust(t)
    return Document(kind, name, version, expires, description, spec, _features(kind, table))


def _features(kind: str, table: Mapping[str, Any]) -> frozenset[str]:
    """The ``FEATURE_RELEASES`` keys a (valid) document's table uses."""
    used = {f"kind {kind}"}
    if kind == "resilience":
        used |= {f"resilience.{k}" for k in ("balancer", "hash", "slow_start") if k in table}
        if "grpc_on" in table.get("retries", {}):
            used.add("resilience.retries.grpc_on")
    elif kind == "route":
        for rule in table.get("rule", []):
            used |= {f"route.rule.{k}" for k in ("path", "method", "query",
                                                 "request_headers") if k in rule}
    return frozenset(used & FEATURE_RELEASES.keys())


def _expires(t: _Table) -> float | None:
    if not t.has("expires"):
        return None
    value = t.raw("expires")
    if isinstance(value, datetime) and value.tzinfo is not None:
        try:
            seconds = value.timestamp()
            datetime.fromtimestamp(seconds, UTC)  # to_json must be able to show it
        except (OverflowError, ValueError, OSError):
            seconds = -1.0
        if seconds < 0:
            raise _Invalid("expires", "expected a date-time from 1970 to 9999 in UTC, "
                           f"found {_show(value)}")
        return seconds
    hint = ""
    if isinstance(value, datetime):
        hint = ' (add "Z" or an offset like +02:00: a local time means different instants ' \
               "on different agents)"
    elif isinstance(value, str):
        hint = " (write the date-time without quotes)"
    raise _Invalid("expires", "expected an offset date-time like 2030-01-01T00:00:00Z, "
                   f"found {_show(value)}{hint}")


_SERVICE_WHAT = ("a service name (letters, digits, '-' or '_', at most 63, starting with a "
                 "letter or digit)")


def _route(t: _Table) -> RouteSpec:
    service = t.string("service", _SERVICE, _SERVICE_WHAT)
    subsets: dict[str, Subset] = {}
    for s in t.tables("subset", FIELDS["route.subset"], MAX_SUBSETS):
        subset = _subset(s)
        if subset.name == ALL_SUBSET:
            raise _Invalid(s.at("name"), f'"{ALL_SUBSET}" is the built-in subset of every '
                           "instance; choose another name")
        if subset.name in subsets:
            raise _Invalid(s.at("name"), f"subset {_quote(subset.name)} is defined twice")
        subsets[subset.name] = subset
    subsets_all = {ALL_SUBSET: ALL_INSTANCES, **subsets}
    if t.has("split"):
        split = _split(t, "split", subsets_all)
    else:
        split = (WeightedSubset(ALL_INSTANCES, 1),)
    rules: list[RouteRule] = []
    for i, r in enumerate(t.tables("rule", FIELDS["route.rule"], MAX_RULES)):
        rule = _rule(r, i, subsets_all)
        if any(rule.name == other.name for other in rules):
            raise _Invalid(r.at("name"), f"rule {_quote(rule.name)} is defined twice")
        rules.append(rule)
    return RouteSpec(service, tuple(subsets.values()), split, tuple(rules))


def _subset(s: _Table) -> Subset:
    name = s.string("name", _SUBSET, "a subset name of lower-case letters, digits, '.', '_' "
                    "or '-' (at most 63)")
    version = None
    if s.has("version"):
        version = s.string("version", _INSTANCE_VERSION, "an instance version (1-64 of "
                           "letters, digits, '_', '.', '+' or '-')")
    tags: list[str] = []
    for i, tag in enumerate(s.array("tags", MAX_TAGS)):
        field = f"{s.at('tags')}[{i}]"
        if not isinstance(tag, str) or not _TAG.fullmatch(tag):
            raise _Invalid(field, "expected a tag (1-64 of letters, digits or '_.:=/+-'), "
                           f"found {_show(tag)}")
        if tag in tags:
            raise _Invalid(field, f"tag {_quote(tag)} is listed twice")
        tags.append(tag)
    if version is None and not tags:
        raise _Invalid(s.path, "a subset selects instances by version and/or tags; give "
                       f'at least one (the built-in subset "{ALL_SUBSET}" is every instance)')
    return Subset(name, version, tuple(tags))


def _split(t: _Table, key: str, subsets: Mapping[str, Subset]) -> tuple[WeightedSubset, ...]:
    entries = t.tables(key, FIELDS["route.split"], MAX_SPLIT)
    if not entries:
        raise _Invalid(t.at(key), "expected at least one entry, found an empty array")
    out: list[WeightedSubset] = []
    for e in entries:
        name = e.string("subset")
        if name not in subsets:
            raise _Invalid(e.at("subset"), f"no subset named {_quote(name)} (defined: "
                           f"{', '.join(_quote(n) for n in subsets)})")
        if any(w.subset.name == name for w in out):
            raise _Invalid(e.at("subset"), f"subset {_quote(name)} appears twice in this split")
        out.append(WeightedSubset(subsets[name], e.integer("weight", 0, MAX_WEIGHT)))
    if not any(w.weight for w in out):
        raise _Invalid(t.at(key), "all weights are 0: at least one subset must get traffic")
    return tuple(out)


def _rule(r: _Table, index: int, subsets: Mapping[str, Subset]) -> RouteRule:
    name = f"rule[{index}]"
    if r.has("name"):
        name = r.string("name", _NAME, "a rule name of lower-case letters, digits, '.', '_' "
                        "or '-' (at most 63)")
    path = _path_match(r.table("path", FIELDS["route.rule.path"])) if r.has("path") else None
    methods = _methods(r) if r.has("method") else ()
    query = tuple(_query_match(q) for q in r.tables("query", FIELDS["route.rule.query"],
                                                     MAX_QUERY_MATCHES))
    matches = [_header_match(h) for h in r.tables("headers", FIELDS["route.rule.headers"],
                                                   MAX_HEADER_MATCHES)]
    if path is None and not methods and not query and not matches:
        # A rule that matches everything would hide the rules after it and the
        # default split; that is what the top-level split is for.
        raise _Invalid(r.path, 'expected at least one condition ("path", "method", "query" '
                       'or "headers"; requests no rule matches take the top-level split)')
    edits = _header_edits(r.table("request_headers", FIELDS["route.rule.request_headers"]))
    if r.has("subset") == r.has("split"):
        raise _Invalid(r.path, 'expected exactly one of "subset" (all matching requests go '
                       'to one subset) or "split" (weighted)')
    if r.has("subset"):
        target = r.string("subset")
        if target not in subsets:
            raise _Invalid(r.at("subset"), f"no subset named {_quote(target)} (defined: "
                           f"{', '.join(_quote(n) for n in subsets)})")
        split: tuple[WeightedSubset, ...] = (WeightedSubset(subsets[target], 1),)
    else:
        split = _split(r, "split", subsets)
    return RouteRule(name, tuple(matches), split, path, methods, query, edits)


_PATH_CHARS = re.compile(r"/[!$&'()*+,;=:@%/A-Za-z0-9._~-]*")


def _path_match(p: _Table) -> PathMatch:
    ops = [k for k in ("exact", "prefix") if p.has(k)]
    if len(ops) != 1:
        found = f"found {' and '.join(ops)}" if ops else "found none"
        raise _Invalid(p.path, f'expected exactly one of "exact" or "prefix", {found}')
    op = ops[0]
    value = p.string(op)
    if len(value) > MAX_PATH:
        raise _Invalid(p.at(op), f"expected at most {MAX_PATH} characters, found "
                       f"{len(value)}")
    if not value.startswith("/"):
        raise _Invalid(p.at(op), f'expected a path starting with "/", found {_show(value)}')
    if not _PATH_CHARS.fullmatch(value):
        raise _Invalid(p.at(op), "expected a path of URI characters (no query, fragment, "
                       f"space or control character), found {_show(value)}")
    if "//" in value:
        raise _Invalid(p.at(op), f'a path cannot contain "//", found {_show(value)}')
    if op == "prefix" and len(value) > 1:
        value = value.rstrip("/")  # "/api/" is the prefix "/api": segments match
    return PathMatch(op, value)


def _methods(r: _Table) -> tuple[str, ...]:
    raw = r.raw("method")
    field = r.at("method")
    items = raw if isinstance(raw, list) else [raw]
    if isinstance(raw, list):
        if not raw:
            raise _Invalid(field, "expected at least 1 entry, found 0 (leave method out to "
                           "match any method)")
        if len(raw) > MAX_METHODS:
            raise _Invalid(field, f"expected at most {MAX_METHODS} entries, found {len(raw)}")
    out: list[str] = []
    for i, m in enumerate(items):
        at = f"{field}[{i}]" if isinstance(raw, list) else field
        if not isinstance(m, str) or not _METHOD.fullmatch(m):
            raise _Invalid(at, 'expected an HTTP method like "GET" (a token of letters, '
                           f"digits and !#$%&'*+.^_`|~-), found {_show(m)}")
        upper = m.upper()
        if upper in out:
            raise _Invalid(at, f"method {_quote(upper)} is listed twice")
        out.append(upper)
    return tuple(out)


_METHOD = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,32}")
_QUERY_NAME = re.compile(r"[^\x00-\x20\x7f&=#]{1,128}")


def _query_match(q: _Table) -> QueryMatch:
    name = q.string("name", _QUERY_NAME, "a query parameter name (1-128 characters, no "
                    "space, control character, '&', '=' or '#')")
    ops = [k for k in ("exact", "present") if q.has(k)]
    if len(ops) != 1:
        found = f"found {' and '.join(ops)}" if ops else "found none"
        raise _Invalid(q.path, f'expected exactly one of "exact" or "present", {found}')
    if ops[0] == "present":
        return QueryMatch(name, "present" if q.boolean("present", True) else "absent")
    return QueryMatch(name, "exact", _header_value(q, "exact"))


def _header_value(t: _Table, key: str) -> str:
    value = t.string(key)
    if len(value) > MAX_HEADER_VALUE:
        raise _Invalid(t.at(key), f"expected at most {MAX_HEADER_VALUE} characters, found "
                       f"{len(value)}")
    if any(c in value for c in "\r\n\0"):
        raise _Invalid(t.at(key), "a header value cannot contain CR, LF or NUL, found "
                       f"{_show(value)}")
    return value


def _editable_name(name: Any, field: str) -> str:
    if not isinstance(name, str) or not _HEADER_NAME.fullmatch(name):
        raise _Invalid(field, "expected an HTTP header name (a token of letters, digits and "
                       f"!#$%&'*+.^_`|~-), found {_show(name)}")
    if name != name.lower():
        raise _Invalid(field, f"expected a lower-case header name, found {_show(name)} "
                       f"(write {_quote(name.lower())})")
    if name.startswith(MESH_HEADER_PREFIX):
        raise _Invalid(field, f"{_quote(name)} is a mesh header ({MESH_HEADER_PREFIX}*): "
                       "the sidecars set them, a rule cannot")
    if name in PROTECTED_HEADERS:
        raise _Invalid(field, f"{_quote(name)} frames or addresses the request (hop-by-hop, "
                       "host or content-length): a rule cannot edit it")
    return name


def _header_edits(e: _Table) -> HeaderEdits:
    seen: dict[str, str] = {}
    lists: dict[str, list[tuple[str, str]]] = {"set": [], "add": []}
    for key in ("set", "add"):
        raw = e.raw(key, {})
        at = e.at(key)
        if not isinstance(raw, Mapping):
            raise _Invalid(at, 'expected a table of header names and values like '
                           f'{{ "x-env" = "canary" }}, found {_show(raw)}')
        if len(raw) > MAX_HEADER_EDITS:
            raise _Invalid(at, f"expected at most {MAX_HEADER_EDITS} headers, found "
                           f"{len(raw)}")
        values = _Table(raw, at, tuple(raw))
        for name in raw:
            field = values.at(str(name))
            _editable_name(name, field)
            if name in seen:
                raise _Invalid(field, f"header {_quote(name)} is also in {seen[name]}: "
                               "give each name one edit")
            seen[name] = key
            lists[key].append((name, _edit_value(values, name)))
    removes: list[str] = []
    for i, name in enumerate(e.array("remove", MAX_HEADER_EDITS)):
        field = f"{e.at('remove')}[{i}]"
        _editable_name(name, field)
        if name in seen:
            raise _Invalid(field, f"header {_quote(name)} is also in {seen[name]}: "
                           "give each name one edit")
        seen[name] = "remove"
        removes.append(name)
    return HeaderEdits(tuple(lists["set"]), tuple(lists["add"]), tuple(removes))


def _edit_value(t: _Table, key: str) -> str:
    value = _header_value(t, key)
    bad = next((c for c in value if (ord(c) < 0x20 and c != "\t") or ord(c) == 0x7f), None)
    if bad is not None:
        raise _Invalid(t.at(key), f"a header value cannot contain control character "
                       f"0x{ord(bad):02x}")
    if not value.isascii():
        raise _Invalid(t.at(key), "expected an ASCII header value (non-ASCII bytes are "
                       f"read differently by different servers), found {_show(value)}")
    if value != value.strip(" \t"):
        raise _Invalid(t.at(key), "a header value cannot start or end with whitespace, "
                       f"found {_show(value)}")
    return value


def _header_match(h: _Table) -> HeaderMatch:
    name = h.string("name", _HEADER_NAME, "an HTTP header name (a token of letters, digits "
                    "and !#$%&'*+.^_`|~-)")
    ops = [k for k in ("exact", "prefix", "present") if h.has(k)]
    if len(ops) != 1:
        found = f"found {' and '.join(ops)}" if ops else "found none"
        raise _Invalid(h.path, f'expected exactly one of "exact", "prefix" or "present", '
                       f"{found}")
    op = ops[0]
    if op == "present":
        present = h.boolean("present", True)
        return HeaderMatch(name.lower(), "present" if present else "absent")
    value = h.string(op)
    if len(value) > MAX_HEADER_VALUE:
        raise _Invalid(h.at(op), f"expected at most {MAX_HEADER_VALUE} characters, found "
                       f"{len(value)}")
    if any(c in value for c in "\r\n\0"):
        raise _Invalid(h.at(op), "a header value cannot contain CR, LF or NUL, found "
                       f"{_show(value)}")
    if op == "prefix" and not value:
        raise _Invalid(h.at(op), 'expected a non-empty prefix (use present = true to match '
                       "any value)")
    return HeaderMatch(name.lower(), op, value)


# Defaults: Envoy's and Linkerd's, adjusted for a mesh without a control plane.
DEFAULT_CONNECT = 2.0
DEFAULT_OVERALL = 15.0
_POSITIVE = 1e-9  # a lower bound that says "more than 0"


def _resilience(t: _Table) -> ResilienceSpec:
    return _resilience_body(t, t.string("service", _SERVICE, _SERVICE_WHAT))


def _resilience_body(t: _Table, service: str) -> ResilienceSpec:
    to = t.table("timeouts", FIELDS["resilience.timeouts"])
    overall = to.duration("overall", _POSITIVE, 3600.0, DEFAULT_OVERALL)
    # Unset, one try may use the whole request's time, and connecting may use the try's.
    per_try = to.duration("per_try", _POSITIVE, 3600.0, overall)
    connect = to.duration("connect", _POSITIVE, 300.0, min(DEFAULT_CONNECT, per_try))
    if per_try > overall:
        raise _Invalid(to.at("per_try"), f"{format_duration(per_try)} is longer than "
                       f"timeouts.overall {format_duration(overall)}: a try cannot outlast "
                       "the request")
    if connect > per_try:
        given = "" if to.has("per_try") else " (which defaults to timeouts.overall)"
        raise _Invalid(to.at("connect"), f"{format_duration(connect)} is longer than "
                       f"timeouts.per_try {format_duration(per_try)}{given}: connecting is "
                       "part of a try")

    re_ = t.table("retries", FIELDS["resilience.retries"])
    attempts = re_.integer("attempts", 1, 10, 3)
    on: list[str] = []
    raw_on = re_.array("on", len(RETRY_CONDITIONS) * 2, 1) if re_.has("on") else [
        "connect-failure", "502", "503"]
    for i, cond in enumerate(raw_on):
        # Status codes read naturally as integers too: on = ["connect-failure", 503].
        c = str(cond) if isinstance(cond, int) and not isinstance(cond, bool) else cond
        field = f"{re_.at('on')}[{i}]"
        if c not in RETRY_CONDITIONS:
            expected = ", ".join(_quote(x) for x in RETRY_CONDITIONS)
            raise _Invalid(field, f"expected one of {expected}, found {_show(cond)}")
        if c in on:
            raise _Invalid(field, f"condition {_quote(c)} is listed twice")
        on.append(c)
    grpc_on: list[str] = []
    raw_grpc = re_.array("grpc_on", len(GRPC_RETRY_STATUSES), 0) if re_.has("grpc_on") \
        else list(DEFAULT_GRPC_ON)
    for i, status in enumerate(raw_grpc):
        field = f"{re_.at('grpc_on')}[{i}]"
        if status not in GRPC_RETRY_STATUSES:
            expected = ", ".join(_quote(x) for x in GRPC_RETRY_STATUSES)
            raise _Invalid(field, f"expected one of {expected}, found {_show(status)}")
        if status in grpc_on:
            raise _Invalid(field, f"gRPC status {_quote(status)} is listed twice")
        grpc_on.append(status)
    non_idempotent = re_.boolean("non_idempotent", False)
    backoff = re_.duration("backoff", 0.0, 10.0, 0.025)
    max_backoff = re_.duration("max_backoff", 0.0, 60.0, max(0.25, backoff))
    if max_backoff < backoff:
        raise _Invalid(re_.at("max_backoff"), f"{format_duration(max_backoff)} is shorter "
                       f"than retries.backoff {format_duration(backoff)}")
    bu = re_.table("budget", FIELDS["resilience.retries.budget"])
    budget = RetryBudget(bu.number("ratio", 0.0, 1.0, 0.2),
                         bu.integer("min_per_second", 0, 100_000, 10),
                         bu.duration("window", 1.0, 60.0, 10.0))

    cb = t.table("circuit_breaker", FIELDS["resilience.circuit_breaker"])
    breaker = CircuitBreaker(cb.integer("max_requests", 1, 1_000_000, 1024),
                             cb.integer("max_pending", 0, 1_000_000, 1024))

    oe = t.table("outlier_ejection", FIELDS["resilience.outlier_ejection"])
    enabled = oe.boolean("enabled", True)
    failures = oe.integer("consecutive_failures", 1, 1000, 5)
    base = oe.duration("base_ejection_time", _POSITIVE, 3600.0, 30.0)
    longest = oe.duration("max_ejection_time", _POSITIVE, 86400.0, max(300.0, base))
    if longest < base:
        raise _Invalid(oe.at("max_ejection_time"), f"{format_duration(longest)} is shorter "
                       f"than outlier_ejection.base_ejection_time {format_duration(base)}")
    percent = oe.integer("max_ejected_percent", 0, 100, 50)
    return ResilienceSpec(
        service, Timeouts(connect, per_try, overall),
        RetryPolicy(attempts, tuple(on), non_idempotent, backoff, max_backoff, budget,
                    tuple(grpc_on)),
        breaker, OutlierEjection(enabled, failures, base, longest, percent), _balancer(t))


_COOKIE_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,128}")  # RFC 6265: a token


def _balancer(t: _Table) -> BalancerSpec:
    algorithm = t.string("balancer", default=DEFAULT_BALANCER)
    if algorithm not in BALANCERS:
        close = difflib.get_close_matches(algorithm, BALANCERS, n=1)
        hint = f' (did you mean "{close[0]}"?)' if close else ""
        raise _Invalid(t.at("balancer"), f"expected one of "
                       f"{', '.join(_quote(b) for b in BALANCERS)}, found {_show(algorithm)}"
                       f"{hint}")
    hash_on: HashOn | None = None
    if algorithm == "hash":
        if not t.has("hash"):
            raise _Invalid(t.at("hash"), 'required when balancer = "hash": give [hash] with '
                           'header = "NAME" or cookie = "NAME"')
        h = t.table("hash", FIELDS["resilience.hash"])
        if h.has("header") == h.has("cookie"):
            found = "found both" if h.has("header") else "found none"
            raise _Invalid(h.path, f'expected exactly one of "header" or "cookie", {found}')
        if h.has("header"):
            hash_on = HashOn(header=h.string("header", _HEADER_NAME, "an HTTP header name (a "
                                             "token of letters, digits and !#$%&'*+.^_`|~-)"
                                             ).lower())
        else:
            hash_on = HashOn(cookie=h.string("cookie", _COOKIE_NAME, "a cookie name (a token "
                                             "of letters, digits and !#$%&'*+.^_`|~-)"))
    elif t.has("hash"):
        raise _Invalid(t.at("hash"), f'[hash] applies only to balancer = "hash" (this '
                       f"document chooses {_quote(algorithm)}); remove it or choose hash")
    ss = t.table("slow_start", FIELDS["resilience.slow_start"])
    slow = SlowStart(ss.duration("window", 0.0, 600.0, DEFAULT_SLOW_START.window),
                     _positive(ss, "aggression", 10.0, DEFAULT_SLOW_START.aggression),
                     _positive(ss, "min_percent", 100.0, DEFAULT_SLOW_START.min_percent))
    return BalancerSpec(algorithm, hash_on, slow)


def _positive(t: _Table, key: str, high: float, default: float) -> float:
    """A number more than 0 and at most ``high``."""
    value = t.raw(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) \
            or not (0 < value <= high):
        bound = f"{int(high)}" if high == int(high) else f"{high:g}"
        raise _Invalid(t.at(key), f"expected a number more than 0 and at most {bound}, "
                       f"found {_show(value)}")
    return float(value)


DEFAULT_RESILIENCE = _resilience_body(_Table({}, "", FIELDS["resilience"]), "")


def _access(t: _Table) -> AccessSpec:
    destination = t.string("destination", _SERVICE, _SERVICE_WHAT)
    default = t.string("default")
    if default not in ("allow", "deny"):
        raise _Invalid("default", f'expected "allow" or "deny", found {_show(default)}')
    lists: dict[str, list[str]] = {}
    for key in ("allow", "deny"):
        names: list[str] = []
        for i, src in enumerate(t.array(key, MAX_SOURCES)):
            field = f"{key}[{i}]"
            if not isinstance(src, str) or not (src == "*" or _SERVICE.fullmatch(src)):
                raise _Invalid(field, f'expected a source service name or "*", found '
                               f"{_show(src)}")
            if src in names:
                raise _Invalid(field, f"{_quote(src)} is listed twice")
            names.append(src)
        lists[key] = names
    for i, src in enumerate(lists["deny"]):
        if src in lists["allow"]:
            raise _Invalid(f"deny[{i}]", f"{_quote(src)} is also in allow; deny would win, "
                           "so list it in one place only")
    return AccessSpec(destination, default, tuple(lists["allow"]), tuple(lists["deny"]))


MAX_FAULT_DELAY = 60.0
MAX_RATE = 1e7


def _fault(t: _Table, expires: float | None) -> FaultSpec:
    service = t.string("service", _SERVICE, _SERVICE_WHAT)
    if expires is None:
        # The envelope's issued time is the store's to compare (MAX_FAULT_LIFETIME).
        raise _Invalid("expires", "required for a fault document: an injected fault must "
                       "end on its own, at most 24h after it is signed")
    t.raw("rule")  # required: a fault document without rules does nothing
    rules: list[FaultRule] = []
    for i, r in enumerate(t.tables("rule", FIELDS["fault.rule"], MAX_RULES)):
        rule = _fault_rule(r, i)
        if any(rule.name == other.name for other in rules):
            raise _Invalid(r.at("name"), f"rule {_quote(rule.name)} is defined twice")
        rules.append(rule)
    if not rules:
        raise _Invalid(t.at("rule"), "expected at least 1 entry, found 0")
    return FaultSpec(service, tuple(rules))


def _fault_rule(r: _Table, index: int) -> FaultRule:
    name = f"rule[{index}]"
    if r.has("name"):
        name = r.string("name", _NAME, "a rule name of lower-case letters, digits, '.', '_' "
                        "or '-' (at most 63)")
    sources = _service_names(r, "sources")
    matches = tuple(_header_match(h) for h in r.tables(
        "headers", FIELDS["fault.rule.headers"], MAX_HEADER_MATCHES))
    route_rule = None
    if r.has("route_rule"):
        route_rule = r.string("route_rule", _NAME, "the name of a rule of the service's route "
                              "document (lower-case letters, digits, '.', '_' or '-')")
    delay = abort = None
    if r.has("delay"):
        d = r.table("delay", FIELDS["fault.rule.delay"])
        d.raw("duration")
        delay = FaultDelay(d.duration("duration", _POSITIVE, MAX_FAULT_DELAY, 0.0),
                           _percent(d))
    if r.has("abort"):
        a = r.table("abort", FIELDS["fault.rule.abort"])
        if a.has("status") == a.has("reset"):
            found = "found both" if a.has("status") else "found none"
            raise _Invalid(a.path, 'expected exactly one of "status" (answer with it) or '
                           f'"reset = true" (reset the connection), {found}')
        status: int | None = None
        if a.has("status"):
            status = a.integer("status", 400, 599)
        elif not a.boolean("reset", True):
            raise _Invalid(a.at("reset"), 'expected true (or give "status" instead), found '
                           "boolean false")
        abort = FaultAbort(status, _percent(a))
    if delay is None and abort is None:
        raise _Invalid(r.path, 'expected "delay", "abort" or both')
    return FaultRule(name, sources, matches, route_rule, delay, abort)


def _percent(t: _Table) -> float:
    t.raw("percent")
    return _positive(t, "percent", 100.0, 0.0)


def _service_names(t: _Table, key: str) -> tuple[str, ...]:
    names: list[str] = []
    for i, src in enumerate(t.array(key, MAX_SOURCES)):
        field = f"{t.at(key)}[{i}]"
        if not isinstance(src, str) or not _SERVICE.fullmatch(src):
            raise _Invalid(field, f"expected a source service name, found {_show(src)}")
        if src in names:
            raise _Invalid(field, f"{_quote(src)} is listed twice")
        names.append(src)
    return tuple(names)


def _ratelimit(t: _Table) -> RateLimitSpec:
    service = t.string("service", _SERVICE, _SERVICE_WHAT)
    rate = _positive(t, "requests_per_second", MAX_RATE, 0.0) \
        if t.has("requests_per_second") else None
    burst = t.duration("burst", _POSITIVE, 60.0, 1.0)
    sources: list[SourceLimit] = []
    for s in t.tables("source", FIELDS["ratelimit.source"], MAX_SOURCES):
        name = s.string("name", _SERVICE, _SERVICE_WHAT)
        if any(other.source == name for other in sources):
            raise _Invalid(s.at("name"), f"source {_quote(name)} is listed twice")
        s.raw("requests_per_second")
        sources.append(SourceLimit(name, _positive(s, "requests_per_second", MAX_RATE, 0.0)))
    if rate is None and not sources:
        raise _Invalid(t.at("requests_per_second"), "required key is missing (it may be left "
                       "out only when [[source]] limits are given)")
    return RateLimitSpec(service, rate, burst, tuple(sources))


def _trust(t: _Table) -> TrustSpec:
    keys: list[PublicKey] = []
    t.raw("keys")  # required: an empty trust set would accept nothing, forever
    for i, text in enumerate(t.array("keys", MAX_TRUST_KEYS, 1)):
        field = f"keys[{i}]"
        if not isinstance(text, str):
            raise _Invalid(field, "expected a public key string ('rumor-ed25519 <base64> "
                           f"<key id>' or bare base64), found {_show(text)}")
        try:
            key = parse_public_key(text)
        except KeyFileError as e:
            raise _Invalid(field, str(e)) from None
        for j, other in enumerate(keys):
            if other.raw == key.raw:
                raise _Invalid(field, f"key {key.id} is listed twice (also keys[{j}])")
        keys.append(key)
    threshold = t.integer("threshold", 1, len(keys), what=" (the number of keys)")
    return TrustSpec(tuple(keys), threshold)


__all__ = ["DEFAULT_RESILIENCE", "document_from_table", "parse_document"]
