"""Fault injection: which requests to a service get a delay, an abort, or both (sans-IO).

A fault document (``FaultSpec``) lists rules; the first rule whose conditions all hold
applies, and later rules are not looked at even when none of its draws hit:

- ``sources``: the caller is one of them (empty: any caller, an unknown one included);
- ``headers``: every ``HeaderMatch`` holds (names lower-cased, as the route's rules);
- ``route_rule``: the request took that route rule (None: whichever it took).

The delay and the abort are then drawn independently, one ``rng.random()`` each, in
that order, whenever the rule has them: a draw hits when it is below ``percent / 100``
(so 0 never hits and 100 always does). How many draws are taken depends only on the
rule that applied, so a seeded ``random.Random`` replays the same decisions for the same
requests. No rule applies, or none of its draws hit: the decision is None.

Where the shell applies it, and what it means for the rest of the pipeline:

- at the **caller's outbound sidecar**, after the route (``route_rule`` is the rule the
  route chose) and **before balancing**: an injected abort picks no instance, opens no
  connection;
- an injected abort (a status or a reset) is the request's answer: it is **never
  retried**, and never counted by the circuit breaker, outlier ejection or the retry
  budget (no instance failed);
- an injected delay is waited out before the first try and **counts toward the overall
  timeout** (``ResilienceSpec.timeouts.overall``), so a delay longer than it ends in
  ``overall_timeout``, as a slow dependency would;
- a ``sources`` restriction trusts the caller's declared identity (the application's
  sidecar names it); it is only trustworthy under mutual TLS, where the caller's
  certificate must name the service it claims to be.

``FaultTable`` is built once per fault document (when the policy changes) and asked per
request; ``header_names`` tells the shell which request headers its rules consult, so it
decodes only those (as ``Evaluator.route_headers`` does for the route).
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass

from ..policy.documents import FaultRule, FaultSpec, HeaderMatch


@dataclass(frozen=True, slots=True)
class FaultDecision:
    """What to inject into one request: hold it ``delay`` seconds (0: no delay), then
    answer ``abort_status`` (None: no abort) or reset the caller's connection
    (``reset``). ``rule`` names the fault rule, for the access log and metrics."""

    rule: str
    delay: float
    abort_status: int | None
    reset: bool

    @property
    def aborts(self) -> bool:
        """Whether the request ends here (a status or a reset) instead of going on."""
        return self.reset or self.abort_status is not None


class _Rule:
    """One ``FaultRule`` ready to be matched: draw probabilities as fractions."""

    __slots__ = ("abort_p", "abort_status", "delay", "delay_p", "has_abort", "has_delay",
                 "headers", "name", "route_rule", "sources")

    def __init__(self, rule: FaultRule) -> None:
        self.name = rule.name
        self.sources: frozenset[str] | None = frozenset(rule.sources) if rule.sources else None
        self.headers: tuple[HeaderMatch, ...] = rule.headers
        self.route_rule = rule.route_rule
        self.has_delay = rule.delay is not None
        self.delay = rule.delay.seconds if rule.delay is not None else 0.0
        self.delay_p = rule.delay.percent / 100.0 if rule.delay is not None else 0.0
        self.has_abort = rule.abort is not None
        self.abort_status = rule.abort.status if rule.abort is not None else None
        self.abort_p = rule.abort.percent / 100.0 if rule.abort is not None else 0.0

    def matches(self, source: str | None, headers: Mapping[str, str],
                route_rule: str | None) -> bool:
        if self.sources is not None and (source is None or source not in self.sources):
            return False
        if self.route_rule is not None and route_rule != self.route_rule:
            return False
        return all(m.matches(headers) for m in self.headers)


class FaultTable:
    """The rules of one ``FaultSpec``, compiled once; ``decide`` per request."""

    __slots__ = ("_rules", "header_names", "spec")

    def __init__(self, spec: FaultSpec) -> None:
        self.spec = spec
        self._rules = tuple(_Rule(r) for r in spec.rules)
        #: The lower-cased header names the rules consult (latin-1 bytes, as the relay
        #: holds them): the shell decodes only these into ``decide``'s ``headers``.
        self.header_names: frozenset[bytes] = frozenset(
            m.name.encode("latin-1") for r in spec.rules for m in r.headers)

    def decide(self, *, source: str | None, headers: Mapping[str, str],
               route_rule: str | None, rng: random.Random) -> FaultDecision | None:
        """The fault for one request (see the module's docstring), or None."""
        for rule in self._rules:
            if not rule.matches(source, headers, route_rule):
                continue
            delay = 0.0
            if rule.has_delay and rng.random() < rule.delay_p:
                delay = rule.delay
            abort = rule.has_abort and rng.random() < rule.abort_p
            if not abort and not delay:
                return None
            return FaultDecision(rule.name, delay,
                                 rule.abort_status if abort else None,
                                 abort and rule.abort_status is None)
        return None


def decide_fault(spec: FaultSpec | None, *, source: str | None, headers: Mapping[str, str],
                 route_rule: str | None, rng: random.Random) -> FaultDecision | None:
    """The fault for one request under ``spec`` (None: no fault document). Compiles the
    spec on every call: the data path keeps a ``FaultTable`` per document instead."""
    if spec is None or not spec.rules:
        return None
    return FaultTable(spec).decide(source=source, headers=headers, route_rule=route_rule,
                                   rng=rng)


__all__ = ["FaultDecision", "FaultTable", "decide_fault"]
