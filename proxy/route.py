"""The route layer's decision for one request (sans-IO): which subset of the service's
instances it goes to, by which rule, with which header edits.

The outbound shell hands over what it has of the request (method, target, raw headers)
and the destination's ``RouteNeeds`` (what the route rules read, known once per policy);
this decodes only that, asks ``Evaluator.route``, and draws the weighted split from the
injected random source. A service without a route document costs one ``None`` check.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass

from ..policy.documents import ALL_INSTANCES, NO_EDITS, HeaderEdits, Subset
from ..policy.evaluate import Evaluator, RouteNeeds, parse_query, split_target


@dataclass(frozen=True, slots=True)
class Routed:
    """Where a request goes: the subset, the rule that chose it (None: the default
    split, or no route document) and the rule's header edits."""

    subset: Subset
    rule: str | None
    edits: HeaderEdits


#: A service without a route document: every instance, no edits.
UNROUTED = Routed(ALL_INSTANCES, None, NO_EDITS)


def header_view(headers: Iterable[tuple[bytes, bytes]], names: frozenset[bytes],
                ) -> dict[str, str]:
    """Only the headers some rule looks at (``names``, lower-cased, as the relay holds
    them), decoded; the first spelling of a name wins, as in ``Evaluator.route``."""
    view: dict[str, str] = {}
    for k, v in headers:
        if k in names:
            view.setdefault(k.decode("latin-1"), v.decode("latin-1"))
    return view


def route_request(ev: Evaluator, service: str, needs: RouteNeeds | None, *, method: bytes,
                  target: bytes, view: dict[str, str], rng: random.Random) -> Routed:
    """The route decision for one request to ``service``; ``view`` holds the headers the
    rules read (``header_view``), ``target`` is the origin-form path and query."""
    if needs is None:
        return UNROUTED
    path, query = "/", None
    if needs.path or needs.query:
        path, raw_query = split_target(target.decode("latin-1"))
        if needs.query:
            query = parse_query(raw_query)
    decision = ev.route(service, view, method=method.decode("latin-1") if needs.method
                        else "GET", path=path, query=query)
    subset = decision.choose(rng.random()) if decision.split else ALL_INSTANCES
    return Routed(subset, decision.rule, decision.request_headers)


__all__ = ["UNROUTED", "Routed", "header_view", "route_request"]
