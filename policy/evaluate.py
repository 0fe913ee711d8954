"""What the held policy documents mean for one request: route, fault, rate limit,
resilience (and its balancer), access.

The proxy asks these questions per request (which subset and header edits, which
fault to inject, how fast may callers come, which timeouts, retries and balancer, may
this caller come in), and the local API asks the same ones to explain a decision
(``GET /v1/evaluate/SERVICE``). Both go through ``Evaluator`` so the explanation is
what the data plane does. An ``Evaluator`` is immutable: the policy service builds a
new one whenever the set of held documents changes, and a request keeps the one it
started with.

Several documents of one kind can name the same service (two operators, or a rename
in progress). Picking "the newest" would depend on arrival order, which differs
between agents; the lowest document name wins instead, so every agent holding the
same documents decides the same way, and the clash is reported in ``conflicts``.
Expiry is the store's business: documents given here are in force.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote_plus

from .documents import (
    ALL_INSTANCES,
    NO_EDITS,
    AccessSpec,
    Document,
    FaultSpec,
    HeaderEdits,
    RateLimitSpec,
    ResilienceSpec,
    RouteSpec,
    Subset,
    WeightedSubset,
)

#: Query parameters read of one request target, at most (the rest are ignored).
MAX_QUERY_PARAMS = 256


def lower_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """Header names lower-cased (they are case-insensitive); when two spellings of one
    name are both present, the first one wins."""
    out: dict[str, str] = {}
    for name, value in headers.items():
        out.setdefault(name.lower(), value)
    return out


def split_target(target: str) -> tuple[str, str]:
    """An origin-form request target split into its path and its raw query (without
    the "?"; a fragment, which a client should not send, is dropped)."""
    target = target.partition("#")[0]
    path, _, query = target.partition("?")
    return path, query


def parse_query(raw: str) -> dict[str, str]:
    """A raw query string as route rules read it: each name to its first value, both
    percent-decoded ("+" is a space); a parameter without "=" has the value "". Only
    the first ``MAX_QUERY_PARAMS`` parameters are read."""
    out: dict[str, str] = {}
    for part in raw.split("&", MAX_QUERY_PARAMS)[:MAX_QUERY_PARAMS]:
        if not part:
            continue
        name, _, value = part.partition("=")
        out.setdefault(unquote_plus(name), unquote_plus(value))
    return out


@dataclass(frozen=True, slots=True)
class RouteNeeds:
    """What a service's route rules read of a request, so the proxy decodes only that:
    the lower-cased header names, and whether any rule looks at the path, the method
    or the query."""

    headers: frozenset[bytes] = frozenset()
    path: bool = False
    method: bool = False
    query: bool = False


#: A route document without rules (or whose rules read nothing but headers).
NO_NEEDS = RouteNeeds()


@dataclass(frozen=True, slots=True)
class RouteDecision:
    """Where requests for ``service`` with these headers go."""

    service: str
    policy: str | None  # the route document's name; None: no route document
    rule: str | None  # the rule that matched; None: the document's default split
    split: tuple[WeightedSubset, ...]
    #: The matched rule's edits of the request headers (none without a rule).
    request_headers: HeaderEdits = NO_EDITS

    def choose(self, u: float) -> Subset:
        """The subset for a uniform draw ``u`` in [0, 1): subset i gets the share
        weight_i / total, in the split's order. Subsets of weight 0 are never chosen."""
        if not (0.0 <= u < 1.0):
            raise ValueError(f"u must be in [0, 1), got {u!r}")
        total = sum(w.weight for w in self.split)
        target = u * total
        cumulative = 0
        for w in self.split:
            cumulative += w.weight
            if target < cumulative:
                return w.subset
        # Only reachable through float rounding at the very top of the range.
        return next(w.subset for w in reversed(self.split) if w.weight)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"service": self.service, "policy": self.policy, "rule": self.rule,
                               "split": [{**w.subset.to_json(), "weight": w.weight}
                                         for w in self.split]}
        if self.request_headers:
            out["request_headers"] = self.request_headers.to_json()
        return out


@dataclass(frozen=True, slots=True)
class AccessDecision:
    """Whether ``source`` may call ``destination``, and why, in words for logs."""

    allowed: bool
    reason: str
    policy: str | None  # the access document's name; None: no access document
    #: The name the caller was judged as; None: its identity is unknown, or it holds
    #: several names and was judged by all of them (``holds``) and allowed.
    source: str | None
    destination: str
    #: The names a caller that declared none holds (a certificate naming several
    #: services), each of which was judged; empty otherwise.
    holds: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        out = {"allowed": self.allowed, "reason": self.reason, "policy": self.policy,
               "source": self.source, "destination": self.destination}
        if self.holds:
            out["holds"] = list(self.holds)
        return out


def _order(doc: Document) -> tuple[str, int, str]:
    # Lowest name first; the same name twice (a store bug) prefers the higher version,
    # and the repr settles even identical name and version the same way everywhere.
    return (doc.name, -doc.version, repr(doc))


class Evaluator:
    """Answers route, fault, rate limit, resilience and access questions from a set of
    documents."""

    def __init__(self, documents: Iterable[Document]) -> None:
        docs = sorted(documents, key=_order)
        self.documents: tuple[Document, ...] = tuple(docs)
        #: Human-readable descriptions of documents that clash, sorted.
        self.conflicts: list[str] = []
        self._conflicts_by_service: dict[str, list[str]] = {}
        by_kind: dict[tuple[str, str], list[Document]] = {}
        for doc in docs:
            service = doc.service
            if service is None:  # the trust document applies to no service
                continue
            by_kind.setdefault((doc.kind, service), []).append(doc)
        self._route: dict[str, tuple[str, RouteSpec]] = {}
        self._resilience: dict[str, tuple[str, ResilienceSpec]] = {}
        self._access: dict[str, tuple[str, AccessSpec]] = {}
        self._fault: dict[str, tuple[str, FaultSpec]] = {}
        self._ratelimit: dict[str, tuple[str, RateLimitSpec]] = {}
        for (kind, service), group in sorted(by_kind.items()):
            chosen = group[0]
            if len(group) > 1:
                names = ", ".join(f'"{d.name}" v{d.version}' for d in group)
                text = (f'{kind}: {len(group)} documents apply to service "{service}" '
                        f'({names}); using "{chosen.name}" v{chosen.version}, the lowest name')
                self.conflicts.append(text)
                self._conflicts_by_service.setdefault(service, []).append(text)
            spec = chosen.spec
            if isinstance(spec, RouteSpec):
                self._route[service] = (chosen.name, spec)
            elif isinstance(spec, ResilienceSpec):
                self._resilience[service] = (chosen.name, spec)
            elif isinstance(spec, AccessSpec):
                self._access[service] = (chosen.name, spec)
            elif isinstance(spec, FaultSpec):
                self._fault[service] = (chosen.name, spec)
            elif isinstance(spec, RateLimitSpec):
                self._ratelimit[service] = (chosen.name, spec)
        #: Per routed service, the (lower-cased) header names its rules look at: the
        #: proxy decodes only those, not every header of every request.
        self._route_headers = {
            service: frozenset(m.name.encode("latin-1") for r in spec.rules for m in r.headers)
            for service, (_, spec) in self._route.items()}
        self._route_needs = {
            service: RouteNeeds(self._route_headers[service],
                                any(r.path is not None for r in spec.rules),
                                any(bool(r.methods) for r in spec.rules),
                                any(bool(r.query) for r in spec.rules))
            for service, (_, spec) in self._route.items()}
        #: The default resilience of services without a document, built once each.
        self._default_resilience: dict[str, ResilienceSpec] = {}
        self._access_decisions: dict[tuple[str | None, str], AccessDecision] = {}
        self._held_decisions: dict[tuple[frozenset[str], str], AccessDecision] = {}

    def names(self, service: str) -> bool:
        """Whether some document applies to ``service``."""
        return service in self._route or service in self._resilience \
            or service in self._access or service in self._fault \
            or service in self._ratelimit

    def route(self, service: str, headers: Mapping[str, str], *, method: str = "GET",
              path: str = "/", query: Mapping[str, str] | None = None) -> RouteDecision:
        """The first rule (in document order) whose conditions all hold (path without
        the query, method as sent, ``query`` as ``parse_query`` gives it, headers), else
        the default split; every instance when the service has no route document."""
        found = self._route.get(service)
        if found is None:
            return RouteDecision(service, None, None, _ALL_SPLIT)
        name, spec = found
        if spec.rules:
            lowered = lower_headers(headers)
            for rule in spec.rules:
                if rule.matches(lowered, method=method, path=path, query=query):
                    return RouteDecision(service, name, rule.name, rule.split,
                                         rule.request_headers)
        return RouteDecision(service, name, None, spec.split)

    def route_headers(self, service: str) -> frozenset[bytes] | None:
        """The lower-cased header names ``service``'s route rules consult (empty when
        it has no rules); None when no route document applies to it."""
        return self._route_headers.get(service)

    def route_needs(self, service: str) -> RouteNeeds | None:
        """What ``service``'s route rules read of a request (``RouteNeeds``); None when
        no route document applies to it (then ``route`` needs nothing: one lookup)."""
        return self._route_needs.get(service)

    def fault(self, service: str) -> tuple[str, FaultSpec] | None:
        """The fault document in force for ``service`` (its name and spec), if any; the
        caller's sidecar picks the rule with ``FaultSpec.rule_for``."""
        return self._fault.get(service)

    def ratelimit(self, service: str) -> tuple[str, RateLimitSpec] | None:
        """The rate limit document in force for ``service`` (its name and spec), if any."""
        return self._ratelimit.get(service)

    def resilience(self, service: str) -> ResilienceSpec:
        """The service's resilience settings (the defaults without a document; the
        same object for every request, so the proxy's state need not compare them)."""
        found = self._resilience.get(service)
        if found is not None:
            return found[1]
        spec = self._default_resilience.get(service)
        if spec is None:
            if len(self._default_resilience) > 4096:
                self._default_resilience.clear()  # names come from requests: bounded
            spec = self._default_resilience[service] = ResilienceSpec.default(service)
        return spec

    def policy_name(self, kind: str, service: str) -> str | None:
        """The name of the document of ``kind`` in force for ``service``, if any."""
        tables: dict[str, Mapping[str, tuple[str, object]]] = {
            "route": self._route, "resilience": self._resilience, "access": self._access,
            "fault": self._fault, "ratelimit": self._ratelimit}
        found = tables.get(kind, {}).get(service)
        return found[0] if found is not None else None

    def access(self, source: str | None, destination: str) -> AccessDecision:
        """Deny beats allow; ``*`` matches any caller, an unknown one included; a caller
        listed nowhere gets the document's default. Without a document: allowed.
        Decided once per (source, destination) for this set of documents."""
        key = (source, destination)
        decision = self._access_decisions.get(key)
        if decision is None:
            if len(self._access_decisions) > 4096:
                self._access_decisions.clear()  # sources come from requests: bounded
            decision = self._access_decisions[key] = self._decide_access(source, destination)
        return decision

    def access_as(self, declared: str | None, holds: Collection[str],
                  destination: str) -> AccessDecision:
        """The access decision for a caller that proved it holds the names ``holds``
        (the services its certificate names; empty without mutual TLS) and declared
        ``declared`` (``x-rumor-source``, None when absent). The rule:

        * a declared name is judged alone, and must be one the caller holds (when it
          proved any): the caller said which of its identities it acts as;
        * no declared name and one name held: that name;
        * no declared name and several held: judged by every one of them, allowed
          only if each alone would be allowed. A denied name denies, and with
          ``default = "deny"`` every name must be in ``allow`` (or ``allow`` hold
          ``"*"``): a caller with several identities never gets more than the least
          privileged of them unless it declares which one it acts as;
        * nothing declared and nothing held: a caller of unknown identity.
        """
        if declared is not None:
            if holds and declared not in holds:
                return AccessDecision(
                    False, f"the caller declared source {declared!r}, which its "
                    f"certificate does not name (it names {_quoted(holds)})",
                    self.policy_name("access", destination), declared, destination,
                    tuple(sorted(holds)))
            return self.access(declared, destination)
        if len(holds) <= 1:
            return self.access(next(iter(holds), None), destination)
        key = (frozenset(holds), destination)
        decision = self._held_decisions.get(key)
        if decision is None:
            if len(self._held_decisions) > 4096:
                self._held_decisions.clear()  # name sets come from certificates: bounded
            decision = self._held_decisions[key] = self._decide_held(key[0], destination)
        return decision

    def _decide_held(self, holds: frozenset[str], destination: str) -> AccessDecision:
        names = tuple(sorted(holds))
        each = [self.access(n, destination) for n in names]
        denied = next((d for d in each if not d.allowed), None)
        policy = self.policy_name("access", destination)
        if denied is not None:
            return AccessDecision(
                False, f"{denied.reason} (the caller's certificate names {_quoted(names)} "
                "and it declared none of them: a caller holding several names is judged "
                "by every one; declare one with x-rumor-source, e.g. --identity)",
                policy, denied.source, destination, names)
        if policy is None:
            why = f'no access policy for "{destination}": allowed'
        else:
            why = (f'allowed by access policy "{policy}": every name the caller\'s '
                   f"certificate holds ({_quoted(names)}) is allowed")
        return AccessDecision(True, why, policy, None, destination, names)

    def _decide_access(self, source: str | None, destination: str) -> AccessDecision:
        found = self._access.get(destination)
        if found is None:
            return AccessDecision(True, f'no access policy for "{destination}": allowed',
                                  None, source, destination)
        name, spec = found
        who = f'source "{source}"' if source is not None else "caller of unknown identity"

        def decide(allowed: bool, why: str) -> AccessDecision:
            verdict = "allowed" if allowed else "denied"
            return AccessDecision(allowed, f'{verdict} by access policy "{name}": {why}',
                                  name, source, destination)

        if source is not None and source in spec.deny:
            return decide(False, f"{who} is denied")
        if "*" in spec.deny:
            return decide(False, f'{who}: every source is denied ("*")')
        if source is not None and source in spec.allow:
            return decide(True, f"{who} is allowed")
        if "*" in spec.allow:
            return decide(True, f'{who}: any source is allowed ("*")')
        if spec.default == "allow":
            return decide(True, f"{who} not listed, default allow")
        return decide(False, f"{who} not allowed")

    def evaluate(self, service: str, *, source: str | None = None,
                 headers: Mapping[str, str] | None = None,
                 holds: Collection[str] = (), method: str = "GET", path: str = "/",
                 query: Mapping[str, str] | None = None) -> dict[str, Any]:
        """A JSON-ready account of every decision for one request to ``service``
        (``holds``: the names the caller's certificate holds, see ``access_as``; ``path``
        without the query, which ``query`` gives parsed)."""
        lowered = lower_headers(headers or {})
        route = self.route(service, lowered, method=method, path=path, query=query)
        fault: dict[str, Any] | None = None
        found = self.fault(service)
        if found is not None:
            rule = found[1].rule_for(source, lowered, route.rule)
            fault = {"policy": found[0], **found[1].to_json(),
                     "applies": rule.to_json() if rule is not None else None}
        limit: dict[str, Any] | None = None
        found_limit = self.ratelimit(service)
        if found_limit is not None:
            spec = found_limit[1]
            limit = {"policy": found_limit[0], **spec.to_json(),
                     "source_limit": spec.source_rate(source)}
        resilience = self.resilience(service)
        return {
            "service": service,
            "request": {"method": method, "path": path, "query": dict(query or {}),
                        "source": source},
            "route": route.to_json(),
            "fault": fault,
            "ratelimit": limit,
            "balancer": resilience.balancer.to_json(),
            "resilience": {"policy": self.policy_name("resilience", service),
                           **resilience.to_json()},
            "access": self.access_as(source, holds, service).to_json(),
            "conflicts": list(self._conflicts_by_service.get(service, [])),
        }


_ALL_SPLIT = (WeightedSubset(ALL_INSTANCES, 1),)


def _quoted(names: Iterable[str]) -> str:
    return ", ".join(f'"{n}"' for n in sorted(names))


__all__ = ["NO_NEEDS", "AccessDecision", "Evaluator", "RouteDecision", "RouteNeeds",
           "lower_headers", "parse_query", "split_target"]
