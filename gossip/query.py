"""Cluster-wide queries: a named request to every live member, answered directly.

Serf's ``query`` over rumor's gossip, sans-IO. The origin packs a query (a name, a small
payload, a filter and a timeout), signs it with its node key, answers it itself and
broadcasts it; every member that hears it relays it once, answers it if the filter
matches, and sends the answer straight to the origin. The origin collects answers until
every expected member answered or the deadline passed, and reports who stayed silent.
The same primitive carries *writes* (the keyring commands): the origin resends a write
to the members still silent, by stream, so it is delivered at least once. A read is
asked again once, by stream, of the members still silent when every answer should have
come (the spread window and ``REASK_AFTER`` past it, before half the timeout): gossip
delivers a broadcast with high probability, not certainty, and a datagram answer can be
lost; the stream gets the held answer, or the query heard for the first time.

Why each rule:

* **Signed by the origin** (its node key, ``identity.py``), and answered only at the
  address our membership table holds for the origin, never one the message names: a
  forged query cannot aim N members' answers at a victim. Answers are signed by the
  answerer, so a third party cannot put words in another member's mouth. Where no key is
  bound to a name (identity ``off``, or ``prefer`` before a binding) the query counts
  unsigned, as that member's alive does: a plaintext cluster is as open as its gossip.
* **Answers never open streams.** A small answer goes by datagram; a large one is
  announced by a datagram ("ready", with its size) and held, and the *origin* fetches it
  by stream, as many at a time as it chooses. So the only traffic a forged query can
  cause towards a victim is one small datagram per member, within the rate limit below.
* **Spread over the deadline.** Each member waits a delay drawn from a hash of (query
  id, its name): 2 ms per live member, at most half the timeout. 1,000 members' answers
  arrive over a second, not at once; no random generator is drawn (the simulator's runs
  stay reproducible whatever queries run).
* **Bounded.** A query must fit one datagram (name ≤ 64, payload ≤ ``MAX_PAYLOAD``),
  an answer is at most ``MAX_ANSWER`` bytes, a timeout between 0.1 s and 60 s; each
  origin gets a token bucket of queries (``QueryLimits``); held answers are bounded in
  count and bytes; a stale or replayed query (issued long before our clock) is refused.

Handlers are registered by name (:meth:`Queries.register`); ``ping`` and ``stats`` are
built in (``builtin_queries.py``). The trio shell waits for answers
(``cluster_query.py``); the simulator drives this very code.
"""

from __future__ import annotations

import hashlib
import heapq
import math
import re
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgpack

from .delegate import Delegate
from .explain import estimate_offset
from .fields import describe
from .membership import Membership
from .wire import Status

CHANNEL = "query"
QUERY_CONTEXT = b"rumor-query-v1\0"
ANSWER_CONTEXT = b"rumor-answer-v1\0"
VERSION = 1

NAME = re.compile(r"[a-z][a-z0-9._-]{0,63}\Z")
#: Largest payload a query carries (the whole query must fit one datagram).
MAX_PAYLOAD = 512
#: Largest answer (by stream); a datagram answer is whatever fits one datagram.
MAX_ANSWER = 4 * 1024 * 1024
MAX_ERROR = 512
MIN_TIMEOUT, MAX_TIMEOUT = 0.1, 60.0
MAX_FILTER_NODES = 64
MAX_FILTER_TAGS = 8
#: A query issued this much before our clock (beyond its timeout), or after it, is
#: refused: a recording replayed once the id left ``_seen``.
CLOCK_SKEW = 30.0
#: Delay per live member when spreading answers (at most half the timeout).
SPREAD_PER_MEMBER = 0.002
#: Members silent this long after a write went out (or its last resend) get it again.
RESEND_AFTER = 0.5
#: A read is asked again, once, of the silent this long after every answer should have
#: come (the answers' spread window), and at most half the timeout after it went out.
REASK_AFTER = 0.25
_SEEN = 4096


class QueryError(ValueError):
    """A query that cannot be sent (bad name, payload, filter or timeout), or that a
    handler refused; the message says why."""


@dataclass(frozen=True)
class QueryLimits:
    """How much one origin may ask of us, and what we hold for others."""

    #: Queries per second from one origin, and the burst.
    rate: float = 5.0
    burst: float = 20.0
    #: Answers held for the origin to fetch, in count and in bytes.
    held: int = 256
    held_bytes: int = 32 * 1024 * 1024
    #: Streams the origin opens at once to fetch large answers or resend writes.
    fetches: int = 16


@dataclass(frozen=True)
class Filter:
    """Which members a query is for: all given conditions hold (empty: everyone)."""

    nodes: tuple[str, ...] = ()
    tags: tuple[tuple[str, str], ...] = ()
    service: str = ""

    def matches(self, name: str, tags: Mapping[str, str], services: Iterable[str]) -> bool:
        if self.nodes and name not in self.nodes:
            return False
        for k, v in self.tags:
            if tags.get(k) != v:
                return False
        return not self.service or self.service in services

    def to_wire(self) -> list[Any]:
        return [list(self.nodes), dict(self.tags), self.service]

    @classmethod
    def from_wire(cls, v: Any) -> Filter:
        nodes, tags, service = v
        if (not isinstance(nodes, list) or len(nodes) > MAX_FILTER_NODES
                or not all(isinstance(n, str) and len(n) <= 256 for n in nodes)):
            raise ValueError("bad node filter")
        if (not isinstance(tags, dict) or len(tags) > MAX_FILTER_TAGS
                or not all(isinstance(k, str) and isinstance(x, str) and len(k) <= 64
                           and len(x) <= 256 for k, x in tags.items())):
            raise ValueError("bad tag filter")
        if not isinstance(service, str) or len(service) > 256:
            raise ValueError("bad service filter")
        return cls(tuple(nodes), tuple(sorted(tags.items())), service)


@dataclass(frozen=True)
class Request:
    """A query as its handler sees it."""

    qid: str
    origin: str
    name: str
    payload: bytes
    #: Our clock when it arrived, and the calendar time then.
    now: float
    wall: float


#: Answers ``Request`` with bytes (msgpack for the built-ins), or raises ``QueryError``.
Handler = Callable[[Request], bytes]


@dataclass(frozen=True)
class Registered:
    handler: Handler
    #: A write is resent to silent members until the deadline (at-least-once).
    write: bool = False
    #: Needs the API token where one is set (tap, explain): what the answer shows.
    guarded: bool = False


@dataclass
class Answer:
    ok: bool
    data: bytes = b""
    error: str = ""
    #: The answerer's calendar time when the query arrived and when it answered.
    received_wall: float = 0.0
    answered_wall: float = 0.0
    #: Our clock when the answer arrived; how it came ("local", "datagram", "stream").
    arrived: float = 0.0
    via: str = "datagram"


@dataclass
class Pending:
    """A query we asked, and what has come back."""

    qid: str
    name: str
    started: float
    deadline: float
    write: bool
    #: The query message, ready to resend.
    message: bytes
    expected: set[str]
    #: Our calendar time when we sent it (for each answerer's clock offset).
    sent_wall: float
    answers: dict[str, Answer] = field(default_factory=dict)
    declined: set[str] = field(default_factory=set)
    resend_at: float = math.inf
    #: A read's one time to ask the silent again by stream, and whom it asked.
    reask_at: float = math.inf
    reasked: set[str] = field(default_factory=set)
    #: The deadline passed (the shell was told once).
    expired: bool = False
    fetch_queue: deque[str] = field(default_factory=deque)
    fetching: set[str] = field(default_factory=set)

    @property
    def missing(self) -> list[str]:
        """The expected members that have not answered (yet)."""
        return sorted(self.expected - self.answers.keys() - self.declined)

    @property
    def complete(self) -> bool:
        return not (self.expected - self.answers.keys() - self.declined)

    def offset(self, member: str) -> tuple[float, float] | None:
        """``member``'s calendar clock minus ours, and the bound of that estimate (half
        the round trip less the time it held the query): NTP's four timestamps."""
        a = self.answers.get(member)
        if a is None or a.via == "local":
            return (0.0, 0.0) if a is not None else None
        return estimate_offset(self.sent_wall, a.received_wall, a.answered_wall,
                               self.sent_wall + (a.arrived - self.started))


@dataclass
class _Held:
    """An answer we sent or will send: kept until the query's deadline, so a resend or
    the origin's fetch gets it again without running the handler twice."""

    origin: str
    message: bytes
    expires: float
    sent: bool = False


@dataclass
class _Bucket:
    tokens: float
    at: float


class Queries(Delegate):
    """The query delegate of one node (see module)."""

    channel = CHANNEL

    def __init__(self, core: Membership, *, rand_id: Callable[[], str], now: float = 0.0,
                 wall_offset: float = 0.0, limits: QueryLimits | None = None,
                 services_of: Callable[[str], set[str]] | None = None,
                 local_services: Callable[[], set[str]] | None = None) -> None:
        self.core = core
        self.limits = limits or QueryLimits()
        self.wall_offset = wall_offset
        self.started = now
        self._rand_id = rand_id
        #: The members running a service (the catalog), for a service filter.
        self._services_of = services_of or (lambda service: set())
        self._local_services = local_services or (lambda: set())
        self.handlers: dict[str, Registered] = {}
        self.pending: dict[str, Pending] = {}
        #: Called with a query's id when one of its answers arrives (the shell wakes).
        self.on_answer: Callable[[str], None] = lambda qid: None
        #: Called when a handler raised something other than ``QueryError`` (the shell
        #: logs it with its traceback; the origin gets the error's name).
        self.on_handler_error: Callable[[str, BaseException], None] = lambda n, e: None
        self._seen: OrderedDict[tuple[str, str], float] = OrderedDict()
        self._held: OrderedDict[tuple[str, str], _Held] = OrderedDict()
        self._held_bytes = 0
        self._outbox: list[tuple[float, str, str]] = []  # (send at, origin, qid)
        self._buckets: dict[str, _Bucket] = {}
        self.stats: dict[str, int] = {
            "queries_started": 0, "queries_answered": 0, "queries_relayed": 0,
            "queries_forged": 0, "queries_unsigned": 0, "queries_throttled": 0,
            "queries_stale": 0, "queries_unknown_origin": 0, "queries_unknown_name": 0,
            "answers_in": 0, "answers_forged": 0, "answers_unexpected": 0,
            "answers_fetched": 0, "answers_fetch_failed": 0, "answers_held_dropped": 0,
            "writes_resent": 0, "reads_reasked": 0, "handler_errors": 0, "bad_messages": 0}
        self._fetch_exchange: dict[int, tuple[str, str]] = {}  # exchange -> (qid, member)

    # ---- registry -----------------------------------------------------------------------

    def register(self, name: str, handler: Handler, *, write: bool = False,
                 guarded: bool = False) -> None:
        """Answer queries called ``name`` with ``handler`` (replacing an older one)."""
        check_name(name)
        self.handlers[name] = Registered(handler, write, guarded)

    # ---- the origin ---------------------------------------------------------------------

    def start(self, now: float, name: str, payload: bytes = b"", *,
              filter: Filter | None = None, timeout: float = 2.0,
              write: bool | None = None) -> str:
        """Ask every live member that matches ``filter``; returns the query's id. Raises
        ``QueryError`` for a bad name, payload, filter or timeout. ``write`` defaults to
        how we registered ``name`` (a write is resent to the silent)."""
        check_name(name)
        if not isinstance(payload, bytes) or len(payload) > MAX_PAYLOAD:
            raise QueryError(f"a query payload is at most {MAX_PAYLOAD} bytes, got "
                             f"{len(payload)}")
        if not MIN_TIMEOUT <= timeout <= MAX_TIMEOUT:
            raise QueryError(f"a query timeout is {MIN_TIMEOUT:g}–{MAX_TIMEOUT:g} s, "
                             f"got {timeout:g}")
        flt = filter or Filter()
        if len(flt.nodes) > MAX_FILTER_NODES or len(flt.tags) > MAX_FILTER_TAGS:
            raise QueryError(f"a filter names at most {MAX_FILTER_NODES} nodes and "
                             f"{MAX_FILTER_TAGS} tags")
        reg = self.handlers.get(name)
        is_write = write if write is not None else (reg is not None and reg.write)
        qid = self._rand_id()
        wall = now + self.wall_offset
        body = msgpack.packb([VERSION, qid, self.core.name, name, payload, flt.to_wire(),
                              int(timeout * 1000), int(wall * 1000), is_write])
        sig = self.core.identity.sign(QUERY_CONTEXT, body) or b""
        message = msgpack.packb(["q", body, sig])
        budget = self.core._datagram_budget() - 48  # the UserMessage's own framing
        if len(message) > budget:
            raise QueryError(f"the query is {len(message)} bytes with its filter and "
                             f"signature; it must fit one datagram ({budget} bytes)")
        # A suspect may well be alive: it is asked, and missing if it is not.
        expected = {m.name for m in self.core.members.values()
                    if m.status in (Status.ALIVE, Status.SUSPECT) and m.name != self.core.name}
        if flt.service:
            expected &= self._services_of(flt.service)
        expected = {n for n in expected if flt.matches(
            n, self.core.members[n].meta, [flt.service] if flt.service else [])}
        p = Pending(qid, name, now, now + timeout, is_write, message, expected, wall)
        self.pending[qid] = p
        self._seen[(self.core.name, qid)] = now + timeout
        self.stats["queries_started"] += 1
        if flt.matches(self.core.name, self.core.members[self.core.name].meta,
                       self._local_services()):
            local = self._answer(Request(qid, self.core.name, name, payload, now, wall))
            p.answers[self.core.name] = Answer(local[0], local[1] if local[0] else b"",
                                               "" if local[0] else local[1].decode(),
                                               wall, wall, now, "local")
        self.core.broadcast(now, CHANNEL, message, key=qid)
        if is_write:
            p.resend_at = now + RESEND_AFTER
        else:
            p.reask_at = now + min(timeout / 2, self._window(timeout) + REASK_AFTER)
        return qid

    def finish(self, qid: str) -> Pending | None:
        """Stop collecting answers to ``qid`` and return what came."""
        return self.pending.pop(qid, None)

    def done(self, now: float, qid: str) -> bool:
        p = self.pending.get(qid)
        return p is None or p.complete or now >= p.deadline

    # ---- timers (driven by the core) ----------------------------------------------------

    def timer_deadline(self) -> float:
        d = self._outbox[0][0] if self._outbox else math.inf
        for p in self.pending.values():
            if p.expired or p.complete:
                continue
            d = min(d, p.deadline, p.resend_at if p.write else p.reask_at)
        return d

    def on_timer(self, now: float) -> None:
        while self._outbox and self._outbox[0][0] <= now:
            _, origin, qid = heapq.heappop(self._outbox)
            held = self._held.get((origin, qid))
            if held is not None and not held.sent:
                held.sent = True
                self._deliver(now, origin, qid, held)
        for p in self.pending.values():
            if not p.expired and now >= p.deadline:
                p.expired = True
                self.on_answer(p.qid)  # the deadline: the shell collects what came
                continue
            if p.write and now >= p.resend_at and not p.complete:
                p.resend_at = now + RESEND_AFTER
                for m in p.missing:
                    if m not in p.fetching and m not in p.fetch_queue:
                        p.fetch_queue.append(m)
                        self.stats["writes_resent"] += 1
                self._pump(now, p)
            elif not p.write and now >= p.reask_at and not p.complete:
                p.reask_at = math.inf
                for m in p.missing:
                    if m not in p.fetching and m not in p.fetch_queue:
                        p.reasked.add(m)
                        p.fetch_queue.append(m)
                        self.stats["reads_reasked"] += 1
                self._pump(now, p)
        self._expire(now)

    # ---- every member -------------------------------------------------------------------

    def notify_message(self, now: float, payload: bytes) -> None:
        try:
            msg: Any = msgpack.unpackb(payload, raw=False)
            if not isinstance(msg, list) or not msg:
                raise ValueError("not a list")
            kind = msg[0]
            if kind == "q":
                _, body, sig = msg
                self._on_query(now, body, sig, direct=False)
            elif kind == "a":
                _, body, sig = msg
                self._on_answer(now, body, sig, "datagram")
            elif kind == "r":
                _, qid, member, size = msg
                self._on_ready(now, qid, member, size)
            else:
                raise ValueError(f"unknown query message {describe(kind)}")
        except (ValueError, TypeError, KeyError, IndexError, msgpack.UnpackException):
            self.stats["bad_messages"] += 1

    def handle_request(self, now: float, host: str, payload: bytes) -> bytes | None:
        """A stream asked us directly: a write resent to us (answer it now), or the
        origin fetching an answer we announced."""
        try:
            msg: Any = msgpack.unpackb(payload, raw=False)
            if not isinstance(msg, list) or not msg:
                raise ValueError("not a list")
            if msg[0] == "q":
                _, body, sig = msg
                return self._on_query(now, body, sig, direct=True)
            if msg[0] == "f":
                _, origin, qid = msg
                held = self._held.get((origin, qid)) if isinstance(origin, str) and \
                    isinstance(qid, str) else None
                o = self.core.members.get(origin) if held is not None else None
                if held is None or o is None or o.addr[0] != host:
                    return None  # only the origin, from its own address, fetches
                held.sent = True
                return held.message
            raise ValueError("unknown request")
        except (ValueError, TypeError, KeyError, IndexError, msgpack.UnpackException):
            self.stats["bad_messages"] += 1
            return None

    def notify_reply(self, now: float, exchange: int, payload: bytes | None) -> None:
        """A stream we opened (a fetch, a resent write) came back."""
        qm = self._fetch_exchange.pop(exchange, None)
        if qm is None:
            return
        qid, member = qm
        p = self.pending.get(qid)
        if p is not None:
            p.fetching.discard(member)
        ok = False
        if payload:
            try:
                msg: Any = msgpack.unpackb(payload, raw=False)
                if isinstance(msg, list) and len(msg) == 3 and msg[0] == "a":
                    ok = self._on_answer(now, msg[1], msg[2], "stream")
                elif isinstance(msg, list) and len(msg) == 3 and msg[0] == "x" \
                        and p is not None and msg[1] == qid and msg[2] == member:
                    p.declined.add(member)  # the filter does not match it after all
                    self.on_answer(qid)
                    ok = True
            except (ValueError, TypeError, msgpack.UnpackException):
                self.stats["bad_messages"] += 1
        if not ok:
            self.stats["answers_fetch_failed"] += 1
        if p is not None:
            self._pump(now, p)

    # ---- receiving a query --------------------------------------------------------------

    def _on_query(self, now: float, body: bytes, sig: bytes, *, direct: bool) -> bytes | None:
        if not isinstance(body, bytes) or not isinstance(sig, bytes) or len(body) > 2048:
            raise ValueError("bad query")
        v: Any = msgpack.unpackb(body, raw=False)
        if not isinstance(v, list) or not v or v[0] != VERSION:
            raise ValueError("unknown query version")
        _, qid, origin, name, payload, flt_v, timeout_ms, issued_ms, write = v
        if not (isinstance(qid, str) and len(qid) <= 64 and isinstance(origin, str)
                and isinstance(name, str) and NAME.match(name)
                and isinstance(payload, bytes) and len(payload) <= MAX_PAYLOAD
                and type(timeout_ms) is int and type(issued_ms) is int
                and isinstance(write, bool)):
            raise ValueError("bad query fields")
        timeout = timeout_ms / 1000
        if not MIN_TIMEOUT <= timeout <= MAX_TIMEOUT:
            raise ValueError("bad query timeout")
        flt = Filter.from_wire(flt_v)
        key = (origin, qid)
        if key in self._seen:
            if direct:  # a resend: what we answered, again
                held = self._held.get(key)
                if held is not None:
                    held.sent = True
                    return held.message
            return None
        if origin == self.core.name:
            return None
        o = self.core.members.get(origin)
        if o is None or o.status != Status.ALIVE:
            self.stats["queries_unknown_origin"] += 1
            return None
        wall = now + self.wall_offset
        issued = issued_ms / 1000
        if issued > wall + CLOCK_SKEW or issued + timeout + CLOCK_SKEW < wall:
            self.stats["queries_stale"] += 1
            return None
        if not self._vouched(now, origin, QUERY_CONTEXT, body, sig, "query"):
            self.stats["queries_forged"] += 1
            return None
        if not sig:
            self.stats["queries_unsigned"] += 1
        # Seen from here on, throttled or not: each retransmit of a refused query
        # must not spend the origin's tokens again.
        self._seen[key] = now + timeout + CLOCK_SKEW
        while len(self._seen) > _SEEN:
            self._seen.popitem(last=False)
        if not self._spend(now, origin):
            self.stats["queries_throttled"] += 1
            return None
        if not direct:
            self.core.broadcast(now, CHANNEL, msgpack.packb(["q", body, sig]), key=qid)
            self.stats["queries_relayed"] += 1
        me = self.core.members[self.core.name]
        if not flt.matches(self.core.name, me.meta, self._local_services()):
            return msgpack.packb(["x", qid, self.core.name]) if direct else None
        ok, data = self._answer(Request(qid, origin, name, payload, now, wall))
        message = self._answer_message(qid, ok, data, wall, now)
        held = _Held(origin, message, now + timeout)
        self._hold(key, held)
        self.stats["queries_answered"] += 1
        if direct:
            held.sent = True
            return message
        heapq.heappush(self._outbox, (now + self._spread(qid, timeout), origin, qid))
        return None

    def _vouched(self, now: float, member: str, context: bytes, body: bytes, sig: bytes,
                 what: str) -> bool:
        """Whether ``body`` counts as ``member``'s word: signed by its bound key, or
        unsigned where its unsigned word counts (no binding; identity off or prefer)."""
        ident = self.core.identity
        if ident.key_of(member) is None and ident.accepts_unsigned(member):
            return True
        return bool(sig) and ident.verify(now, member, context, body, sig,
                                          f"{what}:{member}")

    def _answer(self, r: Request) -> tuple[bool, bytes]:
        """Run the handler: (True, answer) or (False, error text)."""
        reg = self.handlers.get(r.name)
        if reg is None:
            self.stats["queries_unknown_name"] += 1
            return False, f"no handler for query {r.name!r} on this agent".encode()
        try:
            data = reg.handler(r)
        except QueryError as e:
            return False, str(e)[:MAX_ERROR].encode()
        except Exception as e:  # a handler's bug must not stop the node; it is logged
            self.stats["handler_errors"] += 1
            self.on_handler_error(r.name, e)
            return False, f"the {r.name} handler failed: {type(e).__name__}".encode()
        if len(data) > MAX_ANSWER:
            return False, f"answer of {len(data)} bytes exceeds {MAX_ANSWER}".encode()
        return True, data

    def _answer_message(self, qid: str, ok: bool, data: bytes, received_wall: float,
                        now: float) -> bytes:
        answered = now + self.wall_offset
        body = msgpack.packb([qid, self.core.name, ok, data if ok else b"",
                              "" if ok else data.decode(errors="replace")[:MAX_ERROR],
                              int(received_wall * 1e6), int(answered * 1e6)])
        sig = self.core.identity.sign(ANSWER_CONTEXT, body) or b""
        message: bytes = msgpack.packb(["a", body, sig])
        return message

    def _spread(self, qid: str, timeout: float) -> float:
        """This member's delay before answering ``qid`` (see module)."""
        h = hashlib.blake2b(f"{qid}\0{self.core.name}".encode(), digest_size=8).digest()
        return int.from_bytes(h, "big") / 2**64 * self._window(timeout)

    def _window(self, timeout: float) -> float:
        """How long the members' answers to a query of ``timeout`` are spread over."""
        return min(timeout / 2, self.core.num_live() * SPREAD_PER_MEMBER)

    def _deliver(self, now: float, origin: str, qid: str, held: _Held) -> None:
        """Send an answer by datagram if it fits one, else announce it for a fetch."""
        if self.core.send_datagram(now, origin, CHANNEL, held.message):
            return
        self.core.send_datagram(now, origin, CHANNEL, msgpack.packb(
            ["r", qid, self.core.name, len(held.message)]))

    def _hold(self, key: tuple[str, str], held: _Held) -> None:
        old = self._held.pop(key, None)
        if old is not None:
            self._held_bytes -= len(old.message)
        self._held[key] = held
        self._held_bytes += len(held.message)
        lim = self.limits
        while len(self._held) > lim.held or self._held_bytes > lim.held_bytes:
            _, dropped = self._held.popitem(last=False)
            self._held_bytes -= len(dropped.message)
            self.stats["answers_held_dropped"] += 1

    def _expire(self, now: float) -> None:
        while self._held:
            key, held = next(iter(self._held.items()))
            if held.expires > now:
                break
            del self._held[key]
            self._held_bytes -= len(held.message)
        while self._seen:
            key, until = next(iter(self._seen.items()))
            if until > now:
                break
            del self._seen[key]

    def _spend(self, now: float, origin: str) -> bool:
        b = self._buckets.get(origin)
        lim = self.limits
        if b is None:
            if len(self._buckets) >= 4096:
                self._buckets.clear()
            b = self._buckets[origin] = _Bucket(lim.burst, now)
        else:
            b.tokens = min(lim.burst, b.tokens + (now - b.at) * lim.rate)
            b.at = now
        if b.tokens < 1.0:
            return False
        b.tokens -= 1.0
        return True

    # ---- receiving answers --------------------------------------------------------------

    def _on_answer(self, now: float, body: bytes, sig: bytes, via: str) -> bool:
        if not isinstance(body, bytes) or not isinstance(sig, bytes):
            raise ValueError("bad answer")
        v: Any = msgpack.unpackb(body, raw=False)
        qid, member, ok, data, error, received_us, answered_us = v
        if not (isinstance(qid, str) and isinstance(member, str) and isinstance(ok, bool)
                and isinstance(data, bytes) and isinstance(error, str)
                and type(received_us) is int and type(answered_us) is int):
            raise ValueError("bad answer fields")
        p = self.pending.get(qid)
        if p is None or member in p.answers or member not in self.core.members:
            self.stats["answers_unexpected"] += 1
            return False
        if not self._vouched(now, member, ANSWER_CONTEXT, body, sig, "answer"):
            self.stats["answers_forged"] += 1
            return False
        self.stats["answers_in"] += 1
        if via == "stream":
            self.stats["answers_fetched"] += 1
        p.answers[member] = Answer(ok, data, error[:MAX_ERROR], received_us / 1e6,
                                   answered_us / 1e6, now, via)
        p.expected.add(member)  # a member we did not count (joined since) still counts
        self.on_answer(qid)
        return True

    def _on_ready(self, now: float, qid: Any, member: Any, size: Any) -> None:
        if not (isinstance(qid, str) and isinstance(member, str) and type(size) is int):
            raise ValueError("bad ready")
        p = self.pending.get(qid)
        if (p is None or member in p.answers or member in p.fetching
                or member in p.fetch_queue or member not in self.core.members
                or not 0 < size <= MAX_ANSWER + 1024):
            self.stats["answers_unexpected"] += 1
            return
        p.fetch_queue.append(member)
        self._pump(now, p)

    def _pump(self, now: float, p: Pending) -> None:
        """Open the next streams of ``p``'s queue, at most ``limits.fetches`` at once."""
        while p.fetch_queue and len(p.fetching) < self.limits.fetches and now < p.deadline:
            member = p.fetch_queue.popleft()
            if member in p.answers:
                continue
            # A write, or a read asked again, goes whole (its answer comes back on the
            # stream); a read's announced answer is fetched.
            request = p.message if p.write or member in p.reasked \
                else msgpack.packb(["f", self.core.name, p.qid])
            ex = self.core.request(now, member, CHANNEL, request,
                                   timeout=max(0.05, p.deadline - now))
            if ex is None:
                continue
            p.fetching.add(member)
            self._fetch_exchange[ex] = (p.qid, member)


def check_name(name: str) -> None:
    if not isinstance(name, str) or not NAME.match(name):
        raise QueryError(f"bad query name {describe(name)}: lower-case letters, digits, "
                         "'.', '_' and '-', starting with a letter, at most 64")


def new_filter(nodes: Iterable[str] = (), tags: Mapping[str, str] | None = None,
               service: str = "") -> Filter:
    return Filter(tuple(nodes), tuple(sorted((tags or {}).items())), service)


__all__ = ["ANSWER_CONTEXT", "CHANNEL", "MAX_ANSWER", "MAX_PAYLOAD", "QUERY_CONTEXT",
           "Answer", "Filter", "Handler", "Pending", "Queries", "QueryError",
           "QueryLimits", "Registered", "Request", "check_name", "new_filter"]
