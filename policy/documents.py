"""Policy documents: the model, as frozen values, and its limits.

An operator writes a document in TOML; ``parser.py`` checks it strictly into these
values (every agent parses the signed bytes the same way). The evaluator, the store
and the proxy read only these values, never TOML.

Every document starts with the same header::

    kind = "route"            # route | resilience | access | fault | ratelimit | trust
    name = "web-canary"       # [a-z0-9][a-z0-9._-]{0,62}; the replication key
    version = 3               # integer >= 1; a newer version replaces an older one
    expires = 2030-01-01T00:00:00Z   # optional, an offset date-time (not a string)
    description = "..."       # optional

The body depends on the kind; docs/policy.md is the reference and ``examples.py``
holds a commented example of each.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from rumor.gossip.durations import format_duration

from .keys import PublicKey

MAX_DOCUMENT_BYTES = 64 * 1024
KINDS = ("route", "resilience", "access", "fault", "ratelimit", "trust")
#: Kinds and fields an agent of an older release rejects (its parser is strict): the
#: release that first understood each, so ``rumor policy publish`` can warn when live
#: members are too old for a document (``required_release``).
FEATURE_RELEASES: dict[str, str] = {
    "kind fault": "0.2.0", "kind ratelimit": "0.2.0", "resilience.balancer": "0.2.0",
    "resilience.hash": "0.2.0", "resilience.slow_start": "0.2.0",
    "route.rule.path": "0.2.0", "route.rule.method": "0.2.0", "route.rule.query": "0.2.0",
    "route.rule.request_headers": "0.2.0",
    "resilience.retries.grpc_on": "0.3.0",
}
#: Balancing algorithms a resilience document may choose (``balancer = ...``).
BALANCERS = ("peak_ewma", "least_request", "round_robin", "random", "hash")
DEFAULT_BALANCER = "peak_ewma"
#: A fault document must expire at most this long after it was signed: an injected
#: outage that outlives its test is an incident.
MAX_FAULT_LIFETIME = 24 * 3600.0
MAX_VERSION = 2**63 - 1  # fits the signed 64-bit integers of the wire formats
MAX_DESCRIPTION = 4096
TRUST_NAME = "trust"

#: The built-in subset every route can use without defining it: every instance.
ALL_SUBSET = "all"

#: Why a try failed, as a retry policy names it (``on = [...]``); the proxy classifies
#: every failed try into one of these, so the policy and the data plane share one
#: vocabulary. "502" is also a connection that broke before a response, "504" also a
#: try that ran out of its per-try timeout (answered as a gateway timeout).
CONNECT_FAILURE = "connect-failure"
BAD_GATEWAY = "502"
UNAVAILABLE = "503"
GATEWAY_TIMEOUT = "504"
#: Conditions a retry may be taken on.
RETRY_CONDITIONS = (CONNECT_FAILURE, BAD_GATEWAY, UNAVAILABLE, GATEWAY_TIMEOUT)
#: gRPC statuses a retry policy may name (``grpc_on = [...]``), as the gRPC spec spells
#: them (lower case, dashes); a trailers-only answer with one of these is retried.
GRPC_RETRY_STATUSES = ("cancelled", "unknown", "deadline-exceeded", "resource-exhausted",
                       "aborted", "internal", "unavailable", "data-loss")
DEFAULT_GRPC_ON = ("unavailable",)
#: Methods that RFC 9110 defines as idempotent: repeating them is safe.
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})

MAX_SUBSETS = 64
MAX_SPLIT = 64
MAX_RULES = 64
MAX_HEADER_MATCHES = 16
MAX_TAGS = 32
MAX_WEIGHT = 1_000_000
MAX_SOURCES = 256
MAX_TRUST_KEYS = 32
MAX_HEADER_VALUE = 1024
MAX_HEADER_EDITS = 16  # per list (set, add, remove) of a rule's request_headers
MAX_METHODS = 16
MAX_QUERY_MATCHES = 16
MAX_PATH = 1024
#: Request headers a rule may not edit: the mesh's own (``x-rumor-*``), the hop-by-hop
#: ones (RFC 9110 7.6.1) and those that frame or address the request.
PROTECTED_HEADERS = frozenset({
    "connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding",
    "upgrade", "proxy-authenticate", "proxy-authorization", "host", "content-length"})
MESH_HEADER_PREFIX = "x-rumor-"

HEADER_FIELDS = ("kind", "name", "version", "expires", "description")
#: The keys each table may hold, by kind and table path. The validators read their
#: allowed keys from here, and the tests check that each example uses all of them.
FIELDS: dict[str, tuple[str, ...]] = {
    "route": ("service", "subset", "split", "rule"),
    "route.subset": ("name", "version", "tags"),
    "route.split": ("subset", "weight"),
    "route.rule": ("name", "path", "method", "query", "headers", "request_headers",
                   "subset", "split"),
    "route.rule.path": ("exact", "prefix"),
    "route.rule.query": ("name", "exact", "present"),
    "route.rule.headers": ("name", "exact", "prefix", "present"),
    "route.rule.request_headers": ("set", "add", "remove"),
    "resilience": ("service", "balancer", "hash", "slow_start", "timeouts", "retries",
                   "circuit_breaker", "outlier_ejection"),
    "resilience.hash": ("header", "cookie"),
    "resilience.slow_start": ("window", "aggression", "min_percent"),
    "resilience.timeouts": ("connect", "per_try", "overall"),
    "resilience.retries": ("attempts", "on", "non_idempotent", "backoff", "max_backoff",
                           "budget", "grpc_on"),
    "resilience.retries.budget": ("ratio", "min_per_second", "window"),
    "resilience.circuit_breaker": ("max_requests", "max_pending"),
    "resilience.outlier_ejection": ("enabled", "consecutive_failures", "base_ejection_time",
                                    "max_ejection_time", "max_ejected_percent"),
    "access": ("destination", "default", "allow", "deny"),
    "fault": ("service", "rule"),
    "fault.rule": ("name", "sources", "headers", "route_rule", "delay", "abort"),
    "fault.rule.headers": ("name", "exact", "prefix", "present"),
    "fault.rule.delay": ("duration", "percent"),
    "fault.rule.abort": ("status", "reset", "percent"),
    "ratelimit": ("service", "requests_per_second", "burst", "source"),
    "ratelimit.source": ("name", "requests_per_second"),
    "trust": ("keys", "threshold"),
}


class PolicyError(ValueError):
    """A document that cannot be accepted: where (source and field) and why."""

    def __init__(self, source: str, field: str, message: str) -> None:
        self.source = source
        self.field = field
        self.message = message
        super().__init__(f"{source}: {field}: {message}" if field else f"{source}: {message}")

    def __reduce__(self) -> tuple[type[PolicyError], tuple[str, str, str]]:
        return (PolicyError, (self.source, self.field, self.message))


# --- values -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Subset:
    """A named group of a service's instances, selected by version and/or tags."""

    name: str
    version: str | None = None
    tags: tuple[str, ...] = ()

    def matches(self, version: str, tags: Iterable[str]) -> bool:
        """True if an instance with this version and these tags belongs to the subset
        (its version equals ``self.version`` when set, and it has every tag)."""
        if self.version is not None and version != self.version:
            return False
        have = set(tags)
        return all(t in have for t in self.tags)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "tags": list(self.tags)}


#: Every instance of the service (the route of a service without a route document).
ALL_INSTANCES = Subset(ALL_SUBSET)


@dataclass(frozen=True, slots=True)
class WeightedSubset:
    """One entry of a split: this subset gets ``weight`` out of the split's total."""

    subset: Subset
    weight: int

    def to_json(self) -> dict[str, Any]:
        return {"subset": self.subset.name, "weight": self.weight}


@dataclass(frozen=True, slots=True)
class HeaderMatch:
    """One condition of a route rule. ``name`` is lower-cased (header names are
    case-insensitive); ``op`` is ``exact``, ``prefix``, ``present`` or ``absent``."""

    name: str
    op: str
    value: str = ""

    def matches(self, headers: Mapping[str, str]) -> bool:
        """``headers`` must have lower-cased keys (see ``lower_headers``)."""
        got = headers.get(self.name)
        if self.op == "present":
            return got is not None
        if self.op == "absent":
            return got is None
        if got is None:
            return False
        if self.op == "exact":
            return got == self.value
        return got.startswith(self.value)

    def to_json(self) -> dict[str, Any]:
        if self.op in ("present", "absent"):
            return {"name": self.name, "present": self.op == "present"}
        return {"name": self.name, self.op: self.value}


@dataclass(frozen=True, slots=True)
class PathMatch:
    """A condition on the request's path (the target without its query, compared as
    sent: no percent-decoding, no dot-segment removal). ``op`` is ``exact`` or
    ``prefix``; a prefix matches by whole segments: "/api" matches "/api", "/api/" and
    "/api/x" but not "/apix". A prefix is kept without its trailing "/" ("/" alone
    matches every path)."""

    op: str
    value: str

    def matches(self, path: str) -> bool:
        if self.op == "exact":
            return path == self.value
        prefix = self.value.rstrip("/")
        if not prefix:
            return path.startswith("/")
        return path == prefix or path.startswith(prefix + "/")

    def to_json(self) -> dict[str, Any]:
        return {self.op: self.value}


@dataclass(frozen=True, slots=True)
class QueryMatch:
    """A condition on one query parameter (``name`` is case-sensitive; the first
    occurrence of a name is the one compared): ``op`` is ``exact``, ``present`` or
    ``absent``."""

    name: str
    op: str
    value: str = ""

    def matches(self, query: Mapping[str, str]) -> bool:
        got = query.get(self.name)
        if self.op == "present":
            return got is not None
        if self.op == "absent":
            return got is None
        return got == self.value

    def to_json(self) -> dict[str, Any]:
        if self.op in ("present", "absent"):
            return {"name": self.name, "present": self.op == "present"}
        return {"name": self.name, "exact": self.value}


@dataclass(frozen=True, slots=True)
class HeaderEdits:
    """What a route rule does to the request's headers before it is forwarded: ``set``
    replaces every value of a name with one, ``add`` appends a value and keeps the
    existing ones, ``remove`` drops every value. Names are lower-case and each appears
    in at most one of the three lists, so the order of the edits does not matter."""

    set: tuple[tuple[str, str], ...] = ()
    add: tuple[tuple[str, str], ...] = ()
    remove: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.set or self.add or self.remove)

    def names(self) -> frozenset[str]:
        """Every header name the edits touch."""
        return frozenset([n for n, _ in self.set] + [n for n, _ in self.add]
                         + list(self.remove))

    def apply(self, headers: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        """``headers`` (raw name/value pairs, any case) with the edits made: the values
        of removed and set names dropped, then the set and added values appended."""
        drop = {n.encode("latin-1") for n in self.remove} | {
            n.encode("latin-1") for n, _ in self.set}
        out = [(k, v) for k, v in headers if k.lower() not in drop]
        out += [(n.encode("latin-1"), v.encode("latin-1")) for n, v in self.set]
        out += [(n.encode("latin-1"), v.encode("latin-1")) for n, v in self.add]
        return out

    def to_json(self) -> dict[str, Any]:
        return {"set": dict(self.set), "add": dict(self.add), "remove": list(self.remove)}


NO_EDITS = HeaderEdits()


@dataclass(frozen=True, slots=True)
class RouteRule:
    """Requests that meet every condition (path, method, query and headers, ANDed: the
    shape of the Gateway API's HTTPRouteMatch) take this rule's split, with the rule's
    header edits. An empty condition holds for every request."""

    name: str
    headers: tuple[HeaderMatch, ...]
    split: tuple[WeightedSubset, ...]
    path: PathMatch | None = None
    methods: tuple[str, ...] = ()  # any of these (upper-case tokens); empty: any method
    query: tuple[QueryMatch, ...] = ()
    request_headers: HeaderEdits = NO_EDITS

    def matches(self, headers: Mapping[str, str], *, method: str = "GET", path: str = "/",
                query: Mapping[str, str] | None = None) -> bool:
        """``headers`` must have lower-cased keys (see ``lower_headers``); ``path`` is
        without the query, ``query`` maps a name to its first value (``parse_query``).
        The method is compared as sent: methods are case-sensitive (RFC 9110 9.1)."""
        if self.methods and method not in self.methods:
            return False
        if self.path is not None and not self.path.matches(path):
            return False
        if self.query:
            q = query if query is not None else {}
            if not all(m.matches(q) for m in self.query):
                return False
        return all(m.matches(headers) for m in self.headers)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name,
                               "headers": [m.to_json() for m in self.headers],
                               "split": [w.to_json() for w in self.split]}
        if self.path is not None:
            out["path"] = self.path.to_json()
        if self.methods:
            out["method"] = list(self.methods)
        if self.query:
            out["query"] = [m.to_json() for m in self.query]
        if self.request_headers:
            out["request_headers"] = self.request_headers.to_json()
        return out


@dataclass(frozen=True, slots=True)
class RouteSpec:
    service: str
    subsets: tuple[Subset, ...]
    #: The split of requests no rule matched (all instances when the document has none).
    split: tuple[WeightedSubset, ...]
    rules: tuple[RouteRule, ...]

    def to_json(self) -> dict[str, Any]:
        return {"service": self.service, "subsets": [s.to_json() for s in self.subsets],
                "split": [w.to_json() for w in self.split],
                "rules": [r.to_json() for r in self.rules]}


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Seconds. ``per_try`` and ``overall`` run until the response headers arrive;
    bodies then stream without a deadline from the policy."""

    connect: float
    per_try: float
    overall: float

    def to_json(self) -> dict[str, Any]:
        return {"connect": format_duration(self.connect),
                "per_try": format_duration(self.per_try),
                "overall": format_duration(self.overall)}


@dataclass(frozen=True, slots=True)
class RetryBudget:
    """Retries allowed: ``ratio`` of the requests seen in the last ``window`` seconds,
    plus ``min_per_second`` so that a quiet service can still retry (Linkerd's model)."""

    ratio: float
    min_per_second: int
    window: float

    def to_json(self) -> dict[str, Any]:
        return {"ratio": self.ratio, "min_per_second": self.min_per_second,
                "window": format_duration(self.window)}


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    attempts: int  # tries in all, the first included: 1 turns retries off
    on: tuple[str, ...]  # members of RETRY_CONDITIONS
    non_idempotent: bool
    backoff: float  # base of the exponential backoff between tries, seconds
    max_backoff: float
    budget: RetryBudget
    #: gRPC statuses (``GRPC_RETRY_STATUSES``) retried whatever the method: a gRPC call
    #: is always a POST, and its service says by status what is safe to retry.
    grpc_on: tuple[str, ...] = DEFAULT_GRPC_ON

    def backoff_ceiling(self, retry: int) -> float:
        """The longest wait before the ``retry``-th retry (1 for the first): backoff ×
        2^(retry-1), capped at max_backoff. Wait a uniform random time up to it ("full
        jitter"), so that clients that failed together do not retry together."""
        exponent = min(max(retry, 1) - 1, 60)
        return min(self.backoff * 2.0**exponent, self.max_backoff)

    def retryable(self, method: str, condition: str) -> bool:
        """Whether a try of ``method`` that failed with ``condition`` may be retried
        (the attempt count and the budget are the caller's to check). A connect
        failure never reached the upstream, so it is safe to retry for any method."""
        if condition.startswith("grpc:"):  # a gRPC status: the service's word decides
            return condition[5:] in self.grpc_on
        if condition not in self.on:
            return False
        if condition == "connect-failure" or self.non_idempotent:
            return True
        return method.upper() in IDEMPOTENT_METHODS

    def to_json(self) -> dict[str, Any]:
        return {"attempts": self.attempts, "on": list(self.on),
                "non_idempotent": self.non_idempotent,
                "backoff": format_duration(self.backoff),
                "max_backoff": format_duration(self.max_backoff),
                "budget": self.budget.to_json(), "grpc_on": list(self.grpc_on)}


@dataclass(frozen=True, slots=True)
class CircuitBreaker:
    max_requests: int  # requests in flight to the service from this agent
    max_pending: int  # requests waiting for a connection; beyond: fail fast with 503

    def to_json(self) -> dict[str, Any]:
        return {"max_requests": self.max_requests, "max_pending": self.max_pending}


@dataclass(frozen=True, slots=True)
class OutlierEjection:
    enabled: bool
    consecutive_failures: int
    base_ejection_time: float
    max_ejection_time: float
    max_ejected_percent: int

    def ejection_time(self, times_ejected: int) -> float:
        """How long the ``times_ejected``-th ejection in a row lasts (1 for the first):
        base × n, capped, so a flapping instance stays out longer each time."""
        return min(self.base_ejection_time * max(1, times_ejected), self.max_ejection_time)

    def max_ejected(self, instances: int) -> int:
        """How many of ``instances`` may be ejected at once. At least one when the
        percentage is not 0 and there are two or more, so a small service can still
        shed a bad instance."""
        if not self.enabled or instances <= 0:
            return 0
        n = instances * self.max_ejected_percent // 100
        if self.max_ejected_percent > 0 and instances >= 2:
            n = max(n, 1)
        return n

    def to_json(self) -> dict[str, Any]:
        return {"enabled": self.enabled, "consecutive_failures": self.consecutive_failures,
                "base_ejection_time": format_duration(self.base_ejection_time),
                "max_ejection_time": format_duration(self.max_ejection_time),
                "max_ejected_percent": self.max_ejected_percent}



@dataclass(frozen=True, slots=True)
class HashOn:
    """What ``balancer = "hash"`` hashes: one request header (lower-cased name) or one
    cookie; exactly one is set."""

    header: str | None = None
    cookie: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"header": self.header} if self.header is not None else {"cookie": self.cookie}


@dataclass(frozen=True, slots=True)
class SlowStart:
    """A new or readmitted instance's share ramps from ``min_percent`` to full over
    ``window`` seconds (Envoy's slow start: (age / window) ** (1 / aggression)), so its
    first answers cannot decide its fate. ``window`` 0 turns it off."""

    window: float
    aggression: float = 1.0
    min_percent: float = 10.0

    def to_json(self) -> dict[str, Any]:
        return {"window": format_duration(self.window), "aggression": self.aggression,
                "min_percent": self.min_percent}


DEFAULT_SLOW_START = SlowStart(10.0)


@dataclass(frozen=True, slots=True)
class BalancerSpec:
    """How a caller's sidecar picks among a service's instances (``BALANCERS``)."""

    algorithm: str = DEFAULT_BALANCER
    hash_on: HashOn | None = None  # set exactly when algorithm == "hash"
    slow_start: SlowStart = DEFAULT_SLOW_START

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"algorithm": self.algorithm,
                               "slow_start": self.slow_start.to_json()}
        if self.hash_on is not None:
            out["hash"] = self.hash_on.to_json()
        return out


DEFAULT_BALANCER_SPEC = BalancerSpec()


@dataclass(frozen=True, slots=True)
class ResilienceSpec:
    service: str
    timeouts: Timeouts
    retries: RetryPolicy
    circuit_breaker: CircuitBreaker
    outlier_ejection: OutlierEjection
    balancer: BalancerSpec = DEFAULT_BALANCER_SPEC

    @classmethod
    def default(cls, service: str) -> ResilienceSpec:
        """What applies to a service without a resilience document."""
        from .parser import DEFAULT_RESILIENCE  # the parser's defaults: one source of truth
        return replace(DEFAULT_RESILIENCE, service=service)

    def to_json(self) -> dict[str, Any]:
        return {"service": self.service, "timeouts": self.timeouts.to_json(),
                "retries": self.retries.to_json(),
                "circuit_breaker": self.circuit_breaker.to_json(),
                "outlier_ejection": self.outlier_ejection.to_json(),
                "balancer": self.balancer.to_json()}


@dataclass(frozen=True, slots=True)
class AccessSpec:
    """Which sources may call ``destination``. Deny beats allow; ``*`` is any caller,
    including one whose identity is unknown."""

    destination: str
    default: str  # "allow" or "deny"
    allow: tuple[str, ...]
    deny: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {"destination": self.destination, "default": self.default,
                "allow": list(self.allow), "deny": list(self.deny)}


@dataclass(frozen=True, slots=True)
class FaultDelay:
    """Hold ``percent`` of the matching requests for ``seconds`` before they go on."""

    seconds: float
    percent: float

    def to_json(self) -> dict[str, Any]:
        return {"duration": format_duration(self.seconds), "percent": self.percent}


@dataclass(frozen=True, slots=True)
class FaultAbort:
    """Answer ``percent`` of the matching requests with ``status`` at once, or reset
    the caller's connection (``status`` None), as a failing dependency would."""

    status: int | None
    percent: float

    def to_json(self) -> dict[str, Any]:
        if self.status is None:
            return {"reset": True, "percent": self.percent}
        return {"status": self.status, "percent": self.percent}


@dataclass(frozen=True, slots=True)
class FaultRule:
    """Faults for the requests that meet every condition: the caller is one of
    ``sources`` (any when empty; a caller's identity is only trustworthy under mutual
    TLS), its headers match, and it took route rule ``route_rule`` (any when None)."""

    name: str
    sources: tuple[str, ...]
    headers: tuple[HeaderMatch, ...]
    route_rule: str | None
    delay: FaultDelay | None
    abort: FaultAbort | None

    def matches(self, source: str | None, headers: Mapping[str, str],
                route_rule: str | None) -> bool:
        """Whether a request from ``source`` (None: unknown) with these lower-cased
        headers, which took route rule ``route_rule`` (None: no rule), is subject."""
        if self.sources and source not in self.sources:
            return False
        if self.route_rule is not None and route_rule != self.route_rule:
            return False
        return all(m.matches(headers) for m in self.headers)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "sources": list(self.sources),
                "headers": [m.to_json() for m in self.headers],
                "route_rule": self.route_rule,
                "delay": self.delay.to_json() if self.delay else None,
                "abort": self.abort.to_json() if self.abort else None}


@dataclass(frozen=True, slots=True)
class FaultSpec:
    """Faults injected by callers' sidecars into requests to ``service``: the first
    rule whose conditions hold applies."""

    service: str
    rules: tuple[FaultRule, ...]

    def rule_for(self, source: str | None, headers: Mapping[str, str],
                 route_rule: str | None = None) -> FaultRule | None:
        """The first rule (in document order) that applies to the request, if any."""
        return next((r for r in self.rules if r.matches(source, headers, route_rule)), None)

    def to_json(self) -> dict[str, Any]:
        return {"service": self.service, "rules": [r.to_json() for r in self.rules]}


@dataclass(frozen=True, slots=True)
class SourceLimit:
    """At most ``rate`` requests/s from callers identifying as ``source``."""

    source: str
    rate: float

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source, "requests_per_second": self.rate}


@dataclass(frozen=True, slots=True)
class RateLimitSpec:
    """At most ``rate`` requests/s to ``service`` across the whole mesh (None: no
    total), and per source as ``sources`` says. Each instance's inbound sidecar admits
    its share rate × w / W of the live instances' weights; ``burst`` is how many
    seconds of its share an instance may admit at once."""

    service: str
    rate: float | None
    burst: float
    sources: tuple[SourceLimit, ...]

    def source_rate(self, source: str | None) -> float | None:
        """The mesh-wide limit for callers identifying as ``source``, if one is set."""
        return next((s.rate for s in self.sources if s.source == source), None)

    @staticmethod
    def share(rate: float, weight: float, total_weight: float) -> float:
        """What one instance of weight ``weight`` admits of a mesh-wide ``rate`` when the
        live instances' weights sum to ``total_weight`` (all of it when that is 0)."""
        if total_weight <= 0 or weight >= total_weight:
            return rate
        return rate * max(weight, 0.0) / total_weight

    def to_json(self) -> dict[str, Any]:
        return {"service": self.service, "requests_per_second": self.rate,
                "burst": format_duration(self.burst),
                "sources": [s.to_json() for s in self.sources]}


@dataclass(frozen=True, slots=True)
class TrustSpec:
    """The publisher keys trusted for policy documents and how many must sign."""

    keys: tuple[PublicKey, ...]
    threshold: int

    def to_json(self) -> dict[str, Any]:
        return {"keys": [k.line() for k in self.keys], "threshold": self.threshold}


Spec = RouteSpec | ResilienceSpec | AccessSpec | FaultSpec | RateLimitSpec | TrustSpec


@dataclass(frozen=True, slots=True)
class Document:
    kind: str
    name: str
    version: int
    expires: float | None  # unix seconds
    description: str
    spec: Spec
    #: The keys of ``FEATURE_RELEASES`` the document's text uses (recorded by the
    #: parser: an explicit default still makes an older agent reject the document).
    features: frozenset[str] = frozenset()

    @property
    def service(self) -> str | None:
        """The service the document applies to (None for the trust document)."""
        if isinstance(self.spec, RouteSpec | ResilienceSpec | FaultSpec | RateLimitSpec):
            return self.spec.service
        if isinstance(self.spec, AccessSpec):
            return self.spec.destination
        return None

    def to_json(self) -> dict[str, Any]:
        expires = None
        if self.expires is not None:
            expires = datetime.fromtimestamp(self.expires, UTC).isoformat().replace(
                "+00:00", "Z")
        return {"kind": self.kind, "name": self.name, "version": self.version,
                "expires": expires, "description": self.description,
                "spec": self.spec.to_json()}


def _release_key(release: str) -> tuple[int, ...]:
    return tuple(int(p) for p in release.split("."))


def document_features(doc: Document) -> frozenset[str]:
    """The keys of ``FEATURE_RELEASES`` that ``doc`` uses: those its text used (the
    parser's record) and those its values show (for documents built in code)."""
    used = set(doc.features)
    spec = doc.spec
    if doc.kind in ("fault", "ratelimit"):
        used.add(f"kind {doc.kind}")
    if isinstance(spec, ResilienceSpec):
        if spec.balancer.algorithm != DEFAULT_BALANCER:
            used.add("resilience.balancer")
        if spec.balancer.hash_on is not None:
            used.add("resilience.hash")
        if spec.balancer.slow_start != DEFAULT_SLOW_START:
            used.add("resilience.slow_start")
        if spec.retries.grpc_on != DEFAULT_GRPC_ON:
            used.add("resilience.retries.grpc_on")
    if isinstance(spec, RouteSpec):
        for r in spec.rules:
            if r.path is not None:
                used.add("route.rule.path")
            if r.methods:
                used.add("route.rule.method")
            if r.query:
                used.add("route.rule.query")
            if r.request_headers:
                used.add("route.rule.request_headers")
    return frozenset(used & FEATURE_RELEASES.keys())


def required_release(doc: Document) -> str | None:
    """The lowest release whose agents accept ``doc`` (None: every release does), per
    ``FEATURE_RELEASES``: older agents' parsers are strict and reject it."""
    releases = [FEATURE_RELEASES[f] for f in document_features(doc)]
    return max(releases, key=_release_key) if releases else None


__all__ = [
    "ALL_INSTANCES",
    "ALL_SUBSET",
    "BALANCERS",
    "DEFAULT_BALANCER",
    "DEFAULT_BALANCER_SPEC",
    "DEFAULT_SLOW_START",
    "FEATURE_RELEASES",
    "FIELDS",
    "GRPC_RETRY_STATUSES",
    "HEADER_FIELDS",
    "IDEMPOTENT_METHODS",
    "KINDS",
    "MAX_DOCUMENT_BYTES",
    "MAX_FAULT_LIFETIME",
    "NO_EDITS",
    "PROTECTED_HEADERS",
    "RETRY_CONDITIONS",
    "AccessSpec",
    "BalancerSpec",
    "CircuitBreaker",
    "Document",
    "FaultAbort",
    "FaultDelay",
    "FaultRule",
    "FaultSpec",
    "HashOn",
    "HeaderEdits",
    "HeaderMatch",
    "OutlierEjection",
    "PathMatch",
    "PolicyError",
    "QueryMatch",
    "RateLimitSpec",
    "ResilienceSpec",
    "RetryBudget",
    "RetryPolicy",
    "RouteRule",
    "RouteSpec",
    "SlowStart",
    "SourceLimit",
    "Subset",
    "Timeouts",
    "TrustSpec",
    "WeightedSubset",
    "document_features",
    "format_duration",
    "required_release",
]
