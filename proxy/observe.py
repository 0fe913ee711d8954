"""What watches a request: one interface for metrics, the access log, and what comes next
(golden metrics, tap, spans).

A listener makes one ``Exchange`` per request and tells its ``Observer`` about it four
times: when it starts, when each try starts and ends, and when the response is over.
What the pipeline decided along the way (a retry, an ejection, a budget refusal, a
fault) reaches the observer as ``decided``. Every observer sees the same record, so the
access log, ``/metrics`` and a span can never tell different stories about one request,
and a new watcher is a new ``Observer``, not a new branch in the request path.

The record is filled as the request goes: the layers write what they decided (service,
route rule, fault, instance, tries, status, reason code), and ``request_ended`` carries
the bytes sent and whether the response completed. No observer may raise; an observer
that fails would turn a served request into a broken one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from .attempts import Attempts, Endpoint
from .attempts import Event as AttemptEvent


@dataclass(frozen=True, slots=True)
class FaultInjected:
    """The fault layer delayed, aborted or reset the request (``what``)."""

    rule: str
    what: str  # "delay", "abort" or "reset"


@dataclass(frozen=True, slots=True)
class RateLimited:
    """The inbound rate limit refused the request; ``limit``: "total" or "source:NAME"."""

    limit: str


#: What the pipeline decided along the way: the attempt core's events, faults, limits.
Event = AttemptEvent | FaultInjected | RateLimited


@dataclass(slots=True)
class Exchange:
    """One request through one listener, as its observers see it."""

    listener: str  # "outbound" or "inbound"
    method: bytes
    target: bytes
    client: str
    started: float
    service: str = ""
    #: The caller's identity (declared, or proven by its certificate under mutual TLS).
    source: str | None = None
    #: Mutual TLS carried the request: outbound, to the inbound sidecar; inbound, from a
    #: caller whose certificate proved ``source``.
    secured: bool = False
    trace: str = ""
    #: This hop's span id and the caller's (hex; b"": none), and whether the trace is
    #: sampled (``headers.continue_trace``): what a span recorder needs.
    span: bytes = b""
    parent_span: bytes = b""
    sampled: bool = False
    #: The request's headers as received (lower-cased names), for a tap that names some.
    headers: list[tuple[bytes, bytes]] | None = None
    #: The route rule the request took (None: the default split, or no route document).
    route_rule: str | None = None
    #: The fault rule that delayed or aborted it, if any.
    fault: str | None = None
    fault_delay: float = 0.0
    tries: int = 0
    #: The instance of the last try ("node/id"; the local instance id on inbound).
    instance: str = ""
    status: int = 0
    #: The sidecar answered itself: its reason code (``errors.py``) and phrase.
    code: str | None = None
    reason: str | None = None
    #: When the response head was in hand (None: the sidecar answered itself).
    headers_at: float | None = None
    #: The policy that decided a refusal ("kind/name"), for the error body and logs.
    policy: str | None = None
    #: A gRPC call's ``grpc-status`` (from the last try's trailers-only answer, then the
    #: response's trailers, or the sidecar's own answer); None: not gRPC, or none yet.
    grpc_status: int | None = None


class Observer(Protocol):
    """Watches requests. Calls come in order: started, (try_started, try_ended)*,
    decided at any point, ended exactly once."""

    def request_started(self, x: Exchange) -> None: ...

    def try_started(self, x: Exchange, endpoint: Endpoint, now: float) -> None: ...

    def try_ended(self, x: Exchange, endpoint: Endpoint, now: float, outcome: str) -> None:
        """``outcome``: the instance's status as a string ("200"), or the retry condition
        of a try that got no response (``connect-failure``, ``502``, ``504``), or
        ``stale-connection`` / ``client-gone``."""
        ...

    def decided(self, x: Exchange, event: Event) -> None: ...

    def request_ended(self, x: Exchange, now: float, sent: int, complete: bool) -> None: ...


class Observers:
    """Several observers as one, in order. Each call goes only to the members that
    override it (an observer that watches only ends costs nothing at a try's start), and
    straight to the one member when only one does: the fan-out is decided once, here,
    not per request."""

    __slots__ = ("decided", "members", "request_ended", "request_started", "try_ended",
                 "try_started")

    request_started: Callable[[Exchange], None]
    try_started: Callable[[Exchange, Endpoint, float], None]
    try_ended: Callable[[Exchange, Endpoint, float, str], None]
    decided: Callable[[Exchange, Event], None]
    request_ended: Callable[[Exchange, float, int, bool], None]

    def __init__(self, members: Sequence[Observer]) -> None:
        self.members = tuple(members)
        for name in _CALLS:
            setattr(self, name, _fan_out(name, self.members))


#: The observer interface's calls.
_CALLS = ("request_started", "try_started", "try_ended", "decided", "request_ended")


def _fan_out(name: str, members: Sequence[Observer]) -> Callable[..., None]:
    calls = [getattr(m, name) for m in members
             if getattr(type(m), name, None) is not getattr(NullObserver, name)]
    if not calls:
        return _nothing
    if len(calls) == 1:
        return calls[0]  # type: ignore[no-any-return]

    def every(*args: object) -> None:
        for call in calls:
            call(*args)
    return every


def _nothing(*args: object) -> None:
    pass


class NullObserver:
    """Watches nothing (a listener built without metrics or access log). Observers
    that watch only some calls subclass it and override those."""

    def request_started(self, x: Exchange) -> None:
        pass

    def try_started(self, x: Exchange, endpoint: Endpoint, now: float) -> None:
        pass

    def try_ended(self, x: Exchange, endpoint: Endpoint, now: float, outcome: str) -> None:
        pass

    def decided(self, x: Exchange, event: Event) -> None:
        pass

    def request_ended(self, x: Exchange, now: float, sent: int, complete: bool) -> None:
        pass


class RequestEnd:
    """Runs once the response is over (the relay calls it with the body bytes sent and
    whether the response completed): the request's breaker slot comes back, and the
    observer hears of the end."""

    __slots__ = ("clock", "observer", "tries", "x")

    def __init__(self, observer: Observer, x: Exchange, tries: Attempts | None,
                 clock: Callable[[], float]) -> None:
        self.observer = observer
        self.x = x
        self.tries = tries
        self.clock = clock

    def __call__(self, sent: int, complete: bool) -> None:
        if self.tries is not None:
            self.tries.end()
        self.observer.request_ended(self.x, self.clock(), sent, complete)


def observers(*members: Observer | None) -> Observer:
    """The given observers as one (None entries skipped, groups flattened: each call is
    one loop, not a loop per group)."""
    present: list[Observer] = []
    for m in members:
        if isinstance(m, Observers):
            present += m.members
        elif m is not None:
            present.append(m)
    if not present:
        return NullObserver()
    if len(present) == 1:
        return present[0]
    return Observers(present)


__all__ = ["Event", "Exchange", "FaultInjected", "NullObserver", "Observer", "Observers",
           "RateLimited", "RequestEnd", "observers"]
