"""The service catalog: every agent's view of every member's services (sans-IO).

The catalog rides the gossip layer as a delegate on channel ``"catalog"``; the
membership core carries its bytes without knowing what they mean.

*Ownership.* Each agent owns the records of its local services. Every local change
(register, deregister, a check changing status) raises the agent's version counter and
stamps the changed record with it, so records merge last-writer-wins per
``(node, service id)`` and arrive in any order, any number of times. A deregistration
is a tombstone record, kept ``tombstone_ttl`` so late copies cannot resurrect it. Each
process run has an ``epoch`` (the shell passes the wall clock at start): a restarted
agent's records replace all of its previous life's at once.

*Replication.* A change is broadcast as the changed records of one node (the core
piggybacks small messages and sends larger ones, e.g. fifty services registered at
start, over streams); whoever learns something new re-broadcasts it, so it spreads
epidemically. Every push-pull carries the whole catalog, so a joining agent learns all
services in its first exchange and anything lost is repaired.

*Visibility.* Records of members that are failed, left or unknown are kept but not
shown: a member that refutes a false failure is back with its services at once, and a
reaped member's records are dropped. Critical instances are hidden unless asked for.
Each instance carries the probe RTT this agent measured to its host, so ``near=True``
sorts by nearness.

*Bounds.* The catalog holds only what live members say about themselves: records for
a node the membership table does not list, or lists failed or left, are not stored
(``records_not_member``; a broadcast that overtook its node's alive waits in a small
pending buffer for it). Each node may hold at most ``CatalogLimits.services_per_node``
live records and ``bytes_per_node`` encoded bytes (tombstones included), and the whole
catalog at most ``total_bytes``: a local registration past a cap is refused with
``CatalogLimitError``; a peer holds up to ``PEER_SLACK`` times the per-node caps for a
node (records merge one by one and may arrive out of order) and drops and counts the
rest. The total
cap is also what a push-pull's catalog state can weigh, so the state always fits its
share of the stream frame (``STATE_SHARE``), whatever a peer was sent.

*Encoding.* One version byte, then msgpack; decoding untrusted bytes raises only
``CatalogDecodeError`` and every field is checked for type, size and range.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import msgpack

from .checks import CRITICAL, PASSING, SEVERITY, STATUSES, CheckSpec, CheckState, aggregate
from .delegate import Delegate
from .effects import MemberEvent
from .fields import describe, valid_counter, valid_hostname, valid_name, valid_text
from .membership import Membership
from .service_spec import Registration, ServiceDef, protocol_of

CHANNEL = "catalog"
#: The channel of signed record sets: agents of the previous build do not know it, and
#: a core skips a broadcast or a push-pull state of a channel it has no delegate for.
SIGNED_CHANNEL = "catalog-signed"
CATALOG_VERSION = 1
MSG_RECORDS = 1
MSG_STATE = 2
#: On ``SIGNED_CHANNEL``: one node's signed set, and a push-pull's signed sets.
MSG_SIGNED = 3
MSG_SIGNED_STATE = 4
#: Signed with the node key before the set's exact bytes: a catalog statement can
#: never be taken for another kind of signed statement.
SIGN_CONTEXT = b"rumor-catalog-v1\0"
MAX_SIG = 256

MAX_RECORDS = 4096  # per message; a catalog state is bounded by the frame size anyway
MAX_NODES = 65536
MAX_STR = 253
MAX_TAGS = 64
MAX_CHECKS = 16
#: How far (µs) an epoch may lie ahead of our calendar clock: clocks a day apart are
#: wrong, not skewed, and a forged epoch further ahead is refused by every agent.
MAX_EPOCH_AHEAD = 86_400 * 10**6


class CatalogDecodeError(ValueError):
    """Bytes that are not a well-formed catalog message."""


class CatalogLimitError(ValueError):
    """A local registration that would take this node past a catalog cap."""


class Identity(Protocol):
    """What the catalog needs of the node identity (``gossip/identity.py``, reached as
    ``core.identity``): sign our sets, verify others', and say whose plain records
    may still be taken."""

    @property
    def mode(self) -> str: ...  # "off" | "prefer" | "require"

    def sign(self, context: bytes, data: bytes) -> bytes | None: ...

    def verify(self, now: float, node: str, context: bytes, data: bytes, sig: bytes,
               source: str) -> bool: ...

    def accepts_unsigned(self, node: str) -> bool: ...


@dataclass(frozen=True, slots=True)
class CatalogLimits:
    """What one node, and the whole catalog, may hold (see the module docstring).

    The defaults keep a push-pull's catalog state within ``STATE_SHARE`` (half the 16 MiB
    stream frame; member rows and the other delegates have the rest): ``total_bytes``
    counts every record's encoded size and each node's header, which is the state's
    size to within a few bytes of array headers."""

    #: Live (not deleted) records one node may announce.
    services_per_node: int = 256
    #: Encoded bytes of one node's records, tombstones included. A record is at most
    #: about 25 KiB (64 tags, 16 checks of 253-character fields), 256 typical ones
    #: (name, port, a few tags) about 20 KiB.
    bytes_per_node: int = 64 * 1024
    #: Encoded bytes of the whole catalog (every node's records and headers).
    total_bytes: int = 6 * 1024 * 1024
    #: Records of unknown or down members that came by broadcast and wait for their
    #: node's alive: at most this many nodes and bytes, each for ``pending_ttl``.
    pending_nodes: int = 64
    pending_bytes: int = 256 * 1024
    pending_ttl: float = 30.0

    def __post_init__(self) -> None:
        for f in ("services_per_node", "bytes_per_node", "total_bytes", "pending_nodes",
                  "pending_bytes"):
            if getattr(self, f) < 0:
                raise ValueError(f"catalog limit {f} must not be negative")


#: How much more than an owner may announce (``services_per_node``, ``bytes_per_node``)
#: a peer holds for it: records merge one by one, so a new record may arrive before the
#: tombstone of the one it replaces (256 services deregistered and 256 others registered
#: are 512 live records for a moment). An owner never announces more than the caps.
PEER_SLACK = 2

#: The part of a push-pull frame (``wire.MAX_FRAME``, 16 MiB) the catalog may fill.
STATE_SHARE = 8 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class CheckSummary:
    """What other agents learn about a check: its id, kind and status (not its output)."""

    id: str
    kind: str
    status: str


@dataclass(frozen=True, slots=True)
class Record:
    """One service instance as announced by its node, at revision ``rev``."""

    id: str
    name: str
    address: str
    port: int
    tags: tuple[str, ...]
    version: str
    weight: int
    status: str
    checks: tuple[CheckSummary, ...]
    rev: int
    deleted: bool = False


@dataclass(frozen=True, slots=True)
class Instance:
    """A visible service instance, as queries return it."""

    id: str
    service: str
    node: str
    address: str
    port: int
    tags: tuple[str, ...]
    version: str
    weight: int
    status: str
    checks: tuple[CheckSummary, ...]
    #: Smoothed probe RTT from this agent to the instance's agent (0 for local ones,
    #: None when not measured yet).
    rtt: float | None

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "service": self.service, "node": self.node,
                "address": self.address, "port": self.port, "tags": list(self.tags),
                "version": self.version, "weight": self.weight, "status": self.status,
                "protocol": protocol_of(self.tags),
                "checks": [{"id": c.id, "kind": c.kind, "status": c.status}
                           for c in self.checks],
                "rtt_ms": None if self.rtt is None else round(self.rtt * 1000, 3)}


@dataclass(slots=True)
class _NodeEntry:
    epoch: int
    records: dict[str, Record] = field(default_factory=dict)
    #: When each tombstone was learned (our clock), for garbage collection; in that
    #: order, so the oldest is the first.
    buried: dict[str, float] = field(default_factory=dict)
    #: XOR of ``_record_hash`` over ``records``, kept as they change.
    digest: int = 0
    #: Encoded bytes of ``records`` and live (not deleted) records among them.
    size: int = 0
    live: int = 0
    #: The node's own signed statement of ``records``: (set bytes, signature, version),
    #: kept verbatim and relayed as it came; None for records that came plain.
    signed: tuple[bytes, bytes, int] | None = None


@dataclass(slots=True)
class LocalService:
    service: ServiceDef
    checks: dict[str, CheckState]


ChangeListener = Callable[[frozenset[str]], None]


class Catalog(Delegate):
    """The catalog delegate. See the module docstring."""

    channel = CHANNEL

    def __init__(self, core: Membership, *, epoch: int, now: float = 0.0,
                 wall_offset: float = 0.0, tombstone_ttl: float = 3600.0,
                 limits: CatalogLimits | None = None,
                 identity: Identity | None = None) -> None:
        self.core = core
        self.name = core.name
        #: This life's epoch: the calendar time it started, in microseconds (raised
        #: when someone else's records about us must be outbid).
        self.epoch = epoch
        #: Calendar time minus the core's clock, for the epoch plausibility rule.
        self.wall_offset = wall_offset
        self.tombstone_ttl = tombstone_ttl
        self.version = 0
        #: Raised on every visible change; blocking queries wait for it to pass a value.
        self.index = 1
        self.limits = limits or CatalogLimits()
        #: The node identity; None (or mode "off"): no signatures, plain records only.
        self.identity: Identity | None = identity if identity is not None else \
            getattr(core, "identity", None)
        self.stats: dict[str, int] = {"decode_errors": 0, "records_applied": 0,
                                      "records_stale": 0, "records_absurd": 0,
                                      "refutations": 0, "records_not_member": 0,
                                      "records_over_node_cap": 0,
                                      "records_over_total_cap": 0, "records_pending": 0,
                                      "tombstones_evicted": 0, "sets_applied": 0,
                                      "sets_stale": 0, "sets_unverified": 0,
                                      "records_unsigned_refused": 0}
        self.local: dict[str, LocalService] = {}
        self._nodes: dict[str, _NodeEntry] = {self.name: _NodeEntry(epoch)}
        #: Encoded bytes of every entry (records and headers): the push-pull state's size.
        self._bytes = _header_size(self.name)
        #: Broadcast records of nodes not (yet) live members, by node: (when, epoch,
        #: records), oldest first; applied when the node's alive arrives.
        self._pending: dict[str, tuple[float, int, list[Record]]] = {}
        self._pending_bytes = 0
        #: The same for signed sets: (when, the message as it came), by node.
        self._pending_signed: dict[str, tuple[float, bytes]] = {}
        self._service_index: dict[str, int] = {}
        self._listeners: list[ChangeListener] = []
        #: ``state_digest``'s value, None when a change made it stale.
        self._digest: int | None = None

    # ---- local services (commands) -------------------------------------------------------

    def register(self, now: float, reg: Registration) -> list[str]:
        """Add or replace a local service; returns the ids of its checks.

        Check ids are ``SERVICE_ID`` for a single check and ``SERVICE_ID:N`` beyond."""
        self.register_many(now, [reg])
        return list(self.local[reg.service.id].checks)

    def register_many(self, now: float, regs: Iterable[Registration]) -> None:
        """Register several services in one broadcast (e.g. all of a config file), so
        they travel together, over a stream when they do not fit a datagram."""
        regs = list(regs)
        for reg in regs:
            for spec in reg.checks:
                spec.validate()
        self.check_registrations(regs)
        changed: list[Record] = []
        for reg in regs:
            svc = reg.service
            ids = [svc.id] if len(reg.checks) == 1 else [
                f"{svc.id}:{i + 1}" for i in range(len(reg.checks))]
            old = self.local.get(svc.id)
            checks: dict[str, CheckState] = {}
            for cid, spec in zip(ids, reg.checks, strict=True):
                prev = old.checks.get(cid) if old is not None else None
                # Re-registering with the same check keeps its state (no flap to critical).
                checks[cid] = prev if prev is not None and prev.spec == spec else \
                    CheckState(cid, spec, now)
            self.local[svc.id] = LocalService(svc, checks)
            changed.append(self._local_record(svc.id))
        self._publish_local(now, changed)

    def check_registrations(self, regs: list[Registration],
                            removing: Iterable[str] = ()) -> None:
        """Raise ``CatalogLimitError`` if registering ``regs`` (after deregistering
        ``removing``) would take our own records past a per-node cap (peers would
        refuse them). Changes nothing."""
        sizes = {sid: _record_size(self._local_record(sid)) for sid in self.local}
        for sid in removing:
            sizes.pop(sid, None)
        for reg in regs:
            sizes[reg.service.id] = registration_size(reg)
        check_local_limits(len(sizes), sum(sizes.values()), self.limits,
                           _header_size(self.name))

    def footprint(self) -> dict[str, int]:
        """What the catalog holds: nodes with records, records (tombstones included),
        their encoded bytes (what a push-pull carries), records waiting for their
        node's alive, and the caps."""
        return {"nodes": sum(1 for e in self._nodes.values() if e.records),
                "records": sum(len(e.records) for e in self._nodes.values()),
                "bytes": self._bytes, "pending_nodes": len(self._pending),
                "pending_bytes": self._pending_bytes,
                "max_bytes": self.limits.total_bytes,
                "max_node_bytes": self.limits.bytes_per_node,
                "max_node_services": self.limits.services_per_node}

    def deregister(self, now: float, service_id: str) -> bool:
        ls = self.local.pop(service_id, None)
        if ls is None:
            return False
        self.version += 1
        svc = ls.service
        tomb = Record(svc.id, svc.name, svc.address, svc.port, (), "", 1, CRITICAL, (),
                      self.version, deleted=True)
        self._publish_local(now, [tomb], bump=False)
        return True

    def check_result(self, now: float, check_id: str, result: str, output: str = "") -> bool:
        """A probe of a local check finished; True if the check's status changed."""
        ls, st = self._find_check(check_id)
        if not st.record(now, result, output):
            return False
        self._publish_local(now, [self._local_record(ls.service.id)])
        return True

    def heartbeat(self, now: float, check_id: str, status: str = PASSING,
                  output: str = "") -> bool:
        """A TTL check heartbeat from the service (through the API)."""
        ls, st = self._find_check(check_id)
        if not st.heartbeat(now, status, output):
            return False
        self._publish_local(now, [self._local_record(ls.service.id)])
        return True

    def tick(self, now: float) -> None:
        """Expire TTL checks and old tombstones; call at ``next_deadline()``."""
        changed = [sid for sid, ls in self.local.items()
                   if any([st.tick(now) for st in ls.checks.values()])]
        if changed:
            self._publish_local(now, [self._local_record(sid) for sid in changed])
        self._collect_tombstones(now)

    def next_deadline(self) -> float:
        d = math.inf
        for ls in self.local.values():
            for st in ls.checks.values():
                d = min(d, st.next_deadline())
        return d

    def local_checks(self) -> list[tuple[str, CheckState]]:
        """(service id, check state) of every local check."""
        return [(sid, st) for sid, ls in self.local.items() for st in ls.checks.values()]

    # ---- queries ---------------------------------------------------------------------------

    def on_change(self, listener: ChangeListener) -> None:
        """Call ``listener(service_names)`` after every visible change (synchronously)."""
        self._listeners.append(listener)

    def knows(self, name: str) -> bool:
        """Whether a service of this name has ever been in the catalog."""
        return name in self._service_index

    def service_index(self, name: str) -> int:
        """Index of the last change to ``name`` (1 if never seen)."""
        return self._service_index.get(name, 1)

    def instances(self, name: str, *, tag: str | None = None, version: str | None = None,
                  passing: bool = False, include_critical: bool = False,
                  near: bool = False) -> list[Instance]:
        """Visible instances of ``name``. By default critical ones are left out;
        ``passing`` leaves out warning ones too, ``include_critical`` keeps all.
        Sorted by node and id, or by RTT (nearest first) with ``near``."""
        out = [i for i in self._visible() if i.service == name
               and (tag is None or tag in i.tags)
               and (version is None or i.version == version)
               and (include_critical or i.status != CRITICAL)
               and (not passing or i.status == PASSING)]
        if near:
            out.sort(key=lambda i: (math.inf if i.rtt is None else i.rtt, i.node, i.id))
        return out

    def services(self) -> dict[str, dict[str, Any]]:
        """Every visible service: its tags, versions and instance counts by status."""
        out: dict[str, dict[str, Any]] = {}
        for i in self._visible():
            s = out.setdefault(i.service, {"tags": set(), "versions": set(), "instances": 0,
                                           **{st: 0 for st in STATUSES}})
            s["tags"].update(i.tags)
            if i.version:
                s["versions"].add(i.version)
            s["instances"] += 1
            s[i.status] += 1
        return {n: {**s, "tags": sorted(s["tags"]), "versions": sorted(s["versions"])}
                for n, s in sorted(out.items())}

    def _visible(self) -> list[Instance]:
        out: list[Instance] = []
        for node, entry in sorted(self._nodes.items()):
            if node == self.name:
                rtt: float | None = 0.0
                host = self.core.addr[0]
            else:
                m = self.core.members.get(node)
                if m is None or not m.live:
                    continue
                rtt, host = m.rtt, m.addr[0]
            for r in sorted(entry.records.values(), key=lambda r: r.id):
                if not r.deleted:
                    out.append(Instance(r.id, r.name, node, r.address or host, r.port, r.tags,
                                        r.version, r.weight, r.status, r.checks, rtt))
        return out

    # ---- delegate hooks ---------------------------------------------------------------------

    def local_state(self, join: bool) -> bytes:
        # At most limits.total_bytes (plus a few bytes of array headers): every record
        # stored was counted against the total cap, see _put. With signatures required
        # nobody takes plain records, so none are sent.
        if self._mode() == "require":
            return b""
        nodes = [[node, e.epoch, [_record_to_list(r) for r in e.records.values()]]
                 for node, e in self._nodes.items() if e.records]
        return encode([MSG_STATE, nodes])

    def merge_remote_state(self, now: float, data: bytes, join: bool, peer: str) -> None:
        msg = self._decode(data, MSG_STATE)
        if msg is None:
            return
        # The core merged the push-pull's member rows first (anti_entropy._merge), so
        # every member the peer lists that we admit is in our table by now: anything
        # else is not a member, and waits for nothing.
        for node, epoch, records in msg[1]:
            self._apply(now, node, epoch, records)
        self._collect_tombstones(now)

    def notify_message(self, now: float, payload: bytes) -> None:
        msg = self._decode(payload, MSG_RECORDS)
        if msg is None:
            return
        _, node, epoch, records = msg
        news = self._apply(now, node, epoch, records, may_wait=True)
        if news:  # new to us: pass it on, so it spreads epidemically
            self._broadcast(now, node, epoch, news)

    def state_digest(self) -> int:
        """What we hold of every node the membership knows, hashed (see delegate.py).

        Entries of nodes the table does not list (reaped, or not joined yet) are left
        out: when a member is reaped differs from agent to agent, and keeping them in
        would make a difference no exchange settles."""
        if self._digest is None:
            members = self.core.members
            d = 0
            for node, e in self._nodes.items():
                if e.records and node in members:
                    d ^= _entry_hash(node, e)
            self._digest = d
        return self._digest

    def notify_member(self, now: float, event: MemberEvent) -> None:
        if event.kind in ("join", "reap"):
            self._digest = None
        if event.name == self.name:
            return
        if event.kind in ("join", "alive") and (self._pending or self._pending_signed):
            self._release_pending(now, event.name)
        entry = self._nodes.get(event.name)
        if entry is None:
            return
        names = frozenset(r.name for r in entry.records.values())
        if event.kind == "reap":
            self._drop_entry(event.name)
        if event.kind in ("join", "alive", "failed", "left", "reap") and names:
            self._changed(names)

    # ---- internals ----------------------------------------------------------------------------

    def _decode(self, data: bytes, kind: int) -> tuple[Any, ...] | None:
        """A peer's message of the expected kind, or None (counted) for anything else."""
        try:
            msg = decode(data)
        except CatalogDecodeError:
            msg = None
        if msg is None or msg[0] != kind:
            self.stats["decode_errors"] += 1
            return None
        return msg

    def _find_check(self, check_id: str) -> tuple[LocalService, CheckState]:
        for ls in self.local.values():
            st = ls.checks.get(check_id)
            if st is not None:
                return ls, st
        raise KeyError(check_id)

    def _local_record(self, sid: str) -> Record:
        ls = self.local[sid]
        s = ls.service
        checks = tuple(CheckSummary(c.id, c.spec.kind, c.status) for c in ls.checks.values())
        return Record(s.id, s.name, s.address, s.port, s.tags, s.version, s.weight,
                      aggregate([c.status for c in checks]), checks, 0)

    def _publish_local(self, now: float, records: list[Record], bump: bool = True) -> None:
        if not records:
            return
        entry = self._nodes[self.name]
        stamped: list[Record] = []
        names: set[str] = set()
        for r in records:
            if bump:
                self.version += 1
                r = replace(r, rev=self.version)
            self._put(entry, r, now, names)
            stamped.append(r)
        # Our live records are within the caps (register_many checked them); old
        # tombstones make room, oldest first, as they would on every peer.
        self._evict_tombstones(entry, keep=frozenset(r.id for r in stamped))
        self._changed(frozenset(names))
        self._broadcast(now, self.name, self.epoch, stamped)
        self._announce(now)

    def _broadcast(self, now: float, node: str, epoch: int, records: list[Record]) -> None:
        if self._mode() == "require":
            return  # nobody takes plain records
        payload = encode([MSG_RECORDS, node, epoch, [_record_to_list(r) for r in records]])
        key = f"{node}/{records[0].id}" if len(records) == 1 else None
        self.core.broadcast(now, CHANNEL, payload, key=key)

    def _apply(self, now: float, node: str, epoch: int, records: list[Record],
               may_wait: bool = False) -> list[Record]:
        """Merge a node's records; returns those that were news. Records of a node
        that is not a live member are refused, or with ``may_wait`` (a broadcast,
        which may overtake its node's alive) kept a while for its alive."""
        if epoch > (now + self.wall_offset) * 1e6 + MAX_EPOCH_AHEAD:
            # An epoch is a start time; one far in the future can only be forged, and
            # taking it would leave its node unable to outbid it.
            self.stats["records_absurd"] += len(records) or 1
            return []
        if node == self.name:
            self._defend(now, epoch, records)
            return []  # we are the authority on our own services
        m = self.core.members.get(node)
        if m is None or not m.live:
            if may_wait and records:
                self._wait(now, node, epoch, records)
            else:
                self.stats["records_not_member"] += len(records)
            return []
        entry = self._nodes.get(node)
        if not self._plain_ok(node, entry):
            # Its own signed statements speak for it: a plain record could be anyone's.
            # (The plain copies of what it signed, sent for the previous build, are
            # only stale.)
            held = {} if entry is None or epoch > entry.epoch else entry.records
            echo = all((cur := held.get(r.id)) is not None and cur.rev >= r.rev
                       for r in records)
            self.stats["records_stale" if echo else "records_unsigned_refused"] += \
                len(records)
            return []
        names: set[str] = set()
        fresh = False
        if entry is None or epoch > entry.epoch:
            if not records and entry is None:
                return []  # nothing held, nothing to say: no entry for it
            if entry is not None:  # the node restarted: its previous life is over
                names.update(r.name for r in entry.records.values())
                self._drop_entry(node)
            elif len(self._nodes) >= MAX_NODES or \
                    self._bytes + _header_size(node) > self.limits.total_bytes:
                self.stats["records_over_total_cap"] += len(records)
                return []
            else:
                fresh = True
            entry = self._nodes[node] = _NodeEntry(epoch)
            self._bytes += _header_size(node)
            self._digest = None
        elif epoch < entry.epoch:
            self.stats["records_stale"] += len(records)
            return []
        news: list[Record] = []
        limits = self.limits
        max_live = limits.services_per_node * PEER_SLACK
        max_size = limits.bytes_per_node * PEER_SLACK
        for r in records:
            cur = entry.records.get(r.id)
            if cur is not None and cur.rev >= r.rev:
                self.stats["records_stale"] += 1
                continue
            size = _record_size(r)
            grow = size - (_record_size(cur) if cur is not None else 0)
            more = (not r.deleted) - (cur is not None and not cur.deleted)
            if entry.live + more > max_live or entry.size + grow > max_size:
                # Tombstones make room first (they only guard against late copies);
                # past that the node says more than any agent may.
                self._evict_tombstones(entry, keep=frozenset((r.id,)),
                                       room=max(0, entry.size + grow - max_size))
                if entry.live + more > max_live or entry.size + grow > max_size:
                    self.stats["records_over_node_cap"] += 1
                    continue
            if self._bytes + grow > limits.total_bytes:
                self.stats["records_over_total_cap"] += 1
                continue
            self._put(entry, r, now, names)
            news.append(r)
        if news:
            self._evict_tombstones(entry, keep=frozenset(r.id for r in news))
        elif fresh:
            self._drop_entry(node)  # nothing of it was taken: no entry for it either
        self.stats["records_applied"] += len(news)
        if names:
            self._changed(frozenset(names))
        return news

    def _wait(self, now: float, node: str, epoch: int, records: list[Record]) -> None:
        """Keep a broadcast of a node we do not list live until its alive comes (it
        may have overtaken it), within the pending buffer's bounds; the oldest waiting
        node makes room. Push-pull and the digest repair anything this drops."""
        limits = self.limits
        self.stats["records_pending"] += len(records)
        old = self._pending.pop(node, None)
        merged: dict[str, Record] = {}
        if old is not None:
            self._pending_bytes -= _pending_size(node, old[2])
            if old[1] == epoch:
                merged = {r.id: r for r in old[2]}
            elif old[1] > epoch:
                epoch, records, merged = old[1], [], {r.id: r for r in old[2]}
        for r in records:
            cur = merged.get(r.id)
            if cur is None or cur.rev < r.rev:
                merged[r.id] = r
        kept = list(merged.values())
        size = _pending_size(node, kept)
        if len(kept) > limits.services_per_node * PEER_SLACK or \
                size > limits.bytes_per_node * PEER_SLACK or size > limits.pending_bytes:
            self.stats["records_over_node_cap"] += len(records)
            return
        for stale in [n for n, (t, _, _) in self._pending.items()
                      if now - t >= limits.pending_ttl]:
            self._pending_bytes -= _pending_size(stale, self._pending.pop(stale)[2])
        while self._pending and (len(self._pending) >= limits.pending_nodes or
                                 self._pending_bytes + size > limits.pending_bytes):
            first = next(iter(self._pending))
            self._pending_bytes -= _pending_size(first, self._pending.pop(first)[2])
        if len(self._pending) >= limits.pending_nodes:
            return  # a pending buffer of size 0
        self._pending[node] = (now, epoch, kept)
        self._pending_bytes += size

    def _release_pending(self, now: float, node: str) -> None:
        """``node`` became a live member: what waited for it is applied and passed on."""
        signed = self._pending_signed.pop(node, None)
        if signed is not None:
            self._pending_bytes -= len(signed[1])
            if now - signed[0] < self.limits.pending_ttl:
                self._notify_signed(now, signed[1], "")
        held = self._pending.pop(node, None)
        if held is None:
            return
        t, epoch, records = held
        self._pending_bytes -= _pending_size(node, records)
        if now - t >= self.limits.pending_ttl:
            return
        news = self._apply(now, node, epoch, records)
        if news:
            self._broadcast(now, node, epoch, news)

    # ---- signed sets --------------------------------------------------------------------------

    def _mode(self) -> str:
        return "off" if self.identity is None else self.identity.mode

    def _plain_ok(self, node: str, entry: _NodeEntry | None) -> bool:
        """Whether plain records of ``node`` may be taken: always without signatures;
        in "prefer" mode only for a node never seen signed; never in "require"."""
        ident = self.identity
        if ident is None or ident.mode == "off":
            return True
        if ident.mode == "require" or (entry is not None and entry.signed is not None):
            return False
        return ident.accepts_unsigned(node)

    def signed_channel(self) -> Delegate:
        """The delegate of ``SIGNED_CHANNEL``, to register on the core beside this one."""
        return _SignedChannel(self)

    def _announce(self, now: float) -> None:
        """Sign our whole record set (tombstones included) as it now is and send it;
        peers keep and relay those exact bytes."""
        ident = self.identity
        if ident is None or ident.mode == "off":
            return
        entry = self._nodes[self.name]
        body = encode_set(self.name, self.epoch, self.version, entry.records.values())
        sig = ident.sign(SIGN_CONTEXT, body)
        if sig is None:
            return
        self._bytes += len(body) + len(sig) - _signed_size(entry)
        entry.signed = (body, sig, self.version)
        self.core.broadcast(now, SIGNED_CHANNEL, encode([MSG_SIGNED, body, sig]),
                            key=self.name)

    def signed_state(self) -> bytes:
        sets = [[e.signed[0], e.signed[1]] for e in self._nodes.values()
                if e.signed is not None]
        return encode([MSG_SIGNED_STATE, sets]) if sets else b""

    def merge_signed_state(self, now: float, data: bytes, peer: str) -> None:
        msg = self._decode(data, MSG_SIGNED_STATE)
        if msg is None:
            return
        for body, sig in msg[1]:
            self._apply_signed(now, body, sig, peer)

    def _notify_signed(self, now: float, payload: bytes, source: str) -> None:
        msg = self._decode(payload, MSG_SIGNED)
        if msg is None:
            return
        _, body, sig = msg
        node = self._apply_signed(now, body, sig, source, payload)
        if node is not None:  # news: relayed verbatim
            self.core.broadcast(now, SIGNED_CHANNEL, payload, key=node)

    def _apply_signed(self, now: float, body: bytes, sig: bytes, source: str,
                      payload: bytes | None = None) -> str | None:
        """Take a node's signed set if it is newer than what we hold of it and its
        node signed it; returns the node's name if it was news. The set replaces
        everything held for the node (newest signed set wins, no per-record merge).
        ``payload``: the broadcast it came in, kept to wait for an unknown node."""
        ident = self.identity
        if ident is None or ident.mode == "off":
            return None
        try:
            node, epoch, version, records = decode_set(body)
        except CatalogDecodeError:
            self.stats["decode_errors"] += 1
            return None
        if epoch > (now + self.wall_offset) * 1e6 + MAX_EPOCH_AHEAD:
            self.stats["records_absurd"] += len(records) or 1
            return None
        if node == self.name:
            return None  # ours are what we sign now
        m = self.core.members.get(node)
        if m is None or not m.live:
            if payload is not None and len(payload) <= self.limits.pending_bytes:
                self._wait_signed(now, node, payload)
            else:
                self.stats["records_not_member"] += len(records)
            return None
        entry = self._nodes.get(node)
        if entry is not None and entry.signed is not None and \
                (entry.epoch, entry.signed[2]) >= (epoch, version):
            self.stats["sets_stale"] += 1
            return None
        limits = self.limits
        sizes = [_record_size(r) for r in records]
        live = sum(1 for r in records if not r.deleted)
        if live > limits.services_per_node or sum(sizes) > limits.bytes_per_node:
            self.stats["records_over_node_cap"] += len(records)
            return None
        cost = _header_size(node) + sum(sizes) + len(body) + len(sig)
        held = 0 if entry is None else \
            entry.size + _header_size(node) + _signed_size(entry)
        if self._bytes - held + cost > limits.total_bytes:
            self.stats["records_over_total_cap"] += len(records)
            return None
        if not ident.verify(now, node, SIGN_CONTEXT, body, sig, source):
            self.stats["sets_unverified"] += 1
            return None
        old = {} if entry is None else entry.records
        news = [r for r in records if entry is None or epoch != entry.epoch
                or (old.get(r.id) is None or old[r.id].rev < r.rev)]
        names = {r.name for r in old.values()}
        if entry is not None:
            self._drop_entry(node)
        new = self._nodes[node] = _NodeEntry(epoch)
        self._bytes += _header_size(node)
        for r in records:
            self._put(new, r, now, names)
        self._bytes += len(body) + len(sig)
        new.signed = (body, sig, version)
        self._digest = None
        self.stats["sets_applied"] += 1
        if names:
            self._changed(frozenset(names))
        if news and payload is not None:
            # Agents of the previous build read only plain records: pass on what is
            # new in plain form too ("prefer" mode; nothing in "require").
            self._broadcast(now, node, epoch, news)
        return node

    def _wait_signed(self, now: float, node: str, payload: bytes) -> None:
        limits = self.limits
        old = self._pending_signed.pop(node, None)
        if old is not None:
            self._pending_bytes -= len(old[1])
        while self._pending_signed and (
                len(self._pending_signed) >= limits.pending_nodes
                or self._pending_bytes + len(payload) > limits.pending_bytes):
            first = next(iter(self._pending_signed))
            self._pending_bytes -= len(self._pending_signed.pop(first)[1])
        if len(self._pending_signed) >= limits.pending_nodes or \
                self._pending_bytes + len(payload) > limits.pending_bytes:
            return
        self.stats["records_pending"] += 1
        self._pending_signed[node] = (now, payload)
        self._pending_bytes += len(payload)

    def _defend(self, now: float, epoch: int, records: list[Record]) -> None:
        """The owner wins about its own records, as it does about its membership by
        refuting: records about us that we did not write (a newer epoch, a revision
        we never reached, a different record at one we did, a service we do not run)
        are outbid by moving to a newer epoch and announcing what we really run, which
        replaces everything any peer holds for us."""
        if epoch < self.epoch:
            return  # a previous life's: every peer holding our current epoch drops it
        own = self._nodes[self.name].records
        if epoch == self.epoch and not any(_forged(own.get(r.id), r) for r in records):
            return
        self.stats["refutations"] += 1
        self.epoch = max(self.epoch, epoch) + 1
        wall = int((now + self.wall_offset) * 1e6)
        if wall > self.epoch:
            self.epoch = wall
        live = [r for r in own.values() if not r.deleted]  # tombstones hide nothing now
        self._drop_entry(self.name)
        entry = self._nodes[self.name] = _NodeEntry(self.epoch)
        self._bytes += _header_size(self.name)
        self._digest = None
        for r in live:
            self._put(entry, r, now, set())
        self._broadcast(now, self.name, self.epoch, live)
        self._announce(now)

    def _put(self, entry: _NodeEntry, r: Record, now: float, names: set[str]) -> None:
        before = entry.size
        _store(entry, r, now, names)
        self._bytes += entry.size - before

    def _remove(self, entry: _NodeEntry, sid: str) -> None:
        gone = entry.records.pop(sid, None)
        entry.buried.pop(sid, None)
        if gone is not None:
            entry.digest ^= _record_hash(gone)
            size = _record_size(gone)
            entry.size -= size
            entry.live -= not gone.deleted
            self._bytes -= size
            self._digest = None

    def _drop_entry(self, node: str) -> None:
        entry = self._nodes.pop(node, None)
        if entry is not None:
            self._bytes -= entry.size + _header_size(node) + _signed_size(entry)
            self._digest = None

    def _evict_tombstones(self, entry: _NodeEntry, keep: frozenset[str],
                          room: int = 0) -> None:
        """Drop the node's oldest tombstones (but those in ``keep``) while it holds
        more tombstones than ``services_per_node`` or more bytes than its cap, or until
        ``room`` bytes are free."""
        limits = self.limits
        freed = 0
        max_size = limits.bytes_per_node * (1 if entry is self._nodes.get(self.name)
                                             else PEER_SLACK)
        for sid in list(entry.buried):
            if len(entry.buried) <= limits.services_per_node and \
                    entry.size <= max_size and freed >= room:
                break
            if sid in keep:
                continue
            before = entry.size
            self._remove(entry, sid)
            freed += before - entry.size
            self.stats["tombstones_evicted"] += 1

    def _collect_tombstones(self, now: float) -> None:
        for entry in self._nodes.values():
            for sid, t in list(entry.buried.items()):
                if now - t >= self.tombstone_ttl:
                    self._remove(entry, sid)

    def _changed(self, names: frozenset[str]) -> None:
        self._digest = None
        self.index += 1
        for n in names:
            self._service_index[n] = self.index
        for listener in list(self._listeners):
            listener(names)


class _SignedChannel(Delegate):
    """``SIGNED_CHANNEL``: the catalog's signed sets, in broadcasts and push-pull."""

    channel = SIGNED_CHANNEL

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog

    def local_state(self, join: bool) -> bytes:
        return self.catalog.signed_state()

    def merge_remote_state(self, now: float, data: bytes, join: bool, peer: str) -> None:
        self.catalog.merge_signed_state(now, data, peer)

    def notify_message(self, now: float, payload: bytes) -> None:
        # The core does not say who sent a broadcast: the identity's per-source
        # budget sees it as from nobody in particular.
        self.catalog._notify_signed(now, payload, "")


def _signed_size(e: _NodeEntry) -> int:
    return 0 if e.signed is None else len(e.signed[0]) + len(e.signed[1])


def encode_set(node: str, epoch: int, version: int, records: Iterable[Record]) -> bytes:
    """The bytes a node signs: its name, epoch, set version and every record it holds
    (tombstones included), msgpack behind the catalog version byte."""
    return encode([node, epoch, version, [_record_to_list(r) for r in records]])


def decode_set(data: bytes) -> tuple[str, int, int, list[Record]]:
    """``encode_set``'s fields from its exact bytes; raises only ``CatalogDecodeError``."""
    body = _unpack(data)
    if len(body) != 4:
        raise CatalogDecodeError("a signed set is [node, epoch, version, records]")
    return _node(body[0]), _uint(body[1]), _uint(body[2]), _records(body[3])


# ---- limits -------------------------------------------------------------------------------


def registration_size(reg: Registration) -> int:
    """Encoded bytes of the record a registration becomes."""
    svc = reg.service
    n = len(reg.checks)
    ids = [svc.id] if n == 1 else [f"{svc.id}:{i + 1}" for i in range(n)]
    checks = tuple(CheckSummary(cid, spec.kind, PASSING)
                   for cid, spec in zip(ids, reg.checks, strict=True))
    return _record_size(Record(svc.id, svc.name, svc.address, svc.port, svc.tags,
                               svc.version, svc.weight, PASSING, checks, 2**53 - 1))


def check_local_limits(services: int, size: int, limits: CatalogLimits,
                       header: int = 0) -> None:
    """Raise ``CatalogLimitError`` naming the cap that ``services`` live services of
    ``size`` encoded bytes (plus ``header``) would pass."""
    if services > limits.services_per_node:
        raise CatalogLimitError(
            f"{services} services on one agent: at most {limits.services_per_node} "
            f"(peers refuse more)")
    if size + header > limits.bytes_per_node:
        raise CatalogLimitError(
            f"the agent's services take {size + header} bytes in the catalog: at most "
            f"{limits.bytes_per_node} (fewer tags or checks, shorter names)")


def _record_size(r: Record) -> int:
    return len(msgpack.packb(_record_to_list(r), use_bin_type=True))


def _header_size(node: str) -> int:
    """What a node's entry costs in a push-pull state besides its records: its name, a
    counter and array headers (generous)."""
    return len(node.encode()) + 16


def _pending_size(node: str, records: list[Record]) -> int:
    return _header_size(node) + sum(_record_size(r) for r in records)


# ---- encoding -----------------------------------------------------------------------------


def _forged(ours: Record | None, theirs: Record) -> bool:
    """Whether ``theirs``, claimed at our current epoch, is something we never wrote:
    ``ours`` is what we hold for its id (None: nothing, or a tombstone collected)."""
    if ours is None:
        return not theirs.deleted  # an old tombstone echoed back is harmless
    return theirs.rev > ours.rev or (theirs.rev == ours.rev and theirs != ours)


def _store(entry: _NodeEntry, r: Record, now: float, names: set[str]) -> None:
    """Keep ``r`` as the node's record of its id (a deletion becomes a tombstone) and
    note the service names whose instances changed."""
    old = entry.records.get(r.id)
    if old is not None:
        names.add(old.name)
        entry.digest ^= _record_hash(old)
        entry.size -= _record_size(old)
        entry.live -= not old.deleted
    names.add(r.name)
    entry.records[r.id] = r
    entry.digest ^= _record_hash(r)
    entry.size += _record_size(r)
    entry.live += not r.deleted
    entry.buried.pop(r.id, None)  # a newer tombstone goes last: the oldest stays first
    if r.deleted:
        entry.buried[r.id] = now


def _record_hash(r: Record) -> int:
    """A record's revision, hashed: records merge by (id, rev), so equal pairs are
    equal records (the owner never writes two records at one revision)."""
    h = hashlib.blake2b(f"{r.id}\0{r.rev}".encode(), digest_size=8, person=b"rumor-catalog")
    return int.from_bytes(h.digest(), "big")


def _entry_hash(node: str, e: _NodeEntry) -> int:
    h = hashlib.blake2b(f"{node}\0{e.epoch}\0{e.digest}".encode(), digest_size=8,
                        person=b"rumor-catalog")
    return int.from_bytes(h.digest(), "big")


def _record_to_list(r: Record) -> list[Any]:
    return [r.id, r.name, r.address, r.port, list(r.tags), r.version, r.weight,
            STATUSES.index(r.status), [[c.id, c.kind, STATUSES.index(c.status)]
                                       for c in r.checks], r.rev, r.deleted]


def encode(msg: list[Any]) -> bytes:
    packed: bytes = msgpack.packb(msg, use_bin_type=True)
    return bytes([CATALOG_VERSION]) + packed


def decode(data: bytes) -> tuple[Any, ...]:
    """``(MSG_RECORDS, node, epoch, [Record])`` or ``(MSG_STATE, [(node, epoch,
    [Record])])``; raises only ``CatalogDecodeError``."""
    body = _unpack(data)
    kind = body[0]
    if kind == MSG_RECORDS and len(body) == 4:
        return (MSG_RECORDS, _node(body[1]), _uint(body[2]), _records(body[3]))
    if kind == MSG_STATE and len(body) == 2:
        nodes = body[1]
        if type(nodes) is not list or len(nodes) > MAX_NODES:
            raise CatalogDecodeError("catalog state: expected a list of nodes")
        out = []
        for n in nodes:
            if type(n) is not list or len(n) != 3:
                raise CatalogDecodeError("catalog state: a node is [name, epoch, records]")
            out.append((_node(n[0]), _uint(n[1]), _records(n[2])))
        return (MSG_STATE, out)
    if kind == MSG_SIGNED and len(body) == 3:
        return (MSG_SIGNED, *_signed_pair(body[1:]))
    if kind == MSG_SIGNED_STATE and len(body) == 2:
        sets = body[1]
        if type(sets) is not list or len(sets) > MAX_NODES:
            raise CatalogDecodeError("signed state: expected a list of signed sets")
        return (MSG_SIGNED_STATE, [_signed_pair(p) for p in sets])
    raise CatalogDecodeError(f"unknown catalog message ({describe(kind)}, "
                             f"{len(body)} fields)")


def _unpack(data: bytes) -> list[Any]:
    if not data:
        raise CatalogDecodeError("empty message")
    if data[0] != CATALOG_VERSION:
        raise CatalogDecodeError(f"unsupported catalog version {data[0]}")
    try:
        body = msgpack.unpackb(data[1:], raw=False, strict_map_key=True, use_list=True)
    except Exception as e:  # msgpack raises many types; callers want exactly one
        raise CatalogDecodeError(f"malformed msgpack: {type(e).__name__}") from None
    if type(body) is not list or not body:
        raise CatalogDecodeError("a catalog message is a non-empty array")
    return body


def _signed_pair(v: Any) -> tuple[bytes, bytes]:
    if type(v) is not list or len(v) != 2 or type(v[0]) is not bytes or \
            type(v[1]) is not bytes or len(v[1]) > MAX_SIG:
        raise CatalogDecodeError("a signed set is [set bytes, signature]")
    return v[0], v[1]


def _records(v: Any) -> list[Record]:
    if type(v) is not list or len(v) > MAX_RECORDS:
        raise CatalogDecodeError("expected a list of records")
    return [_record(r) for r in v]


def _record(v: Any) -> Record:
    if type(v) is not list or len(v) != 11:
        raise CatalogDecodeError("a record has 11 fields")
    tags = v[4]
    if type(tags) is not list or len(tags) > MAX_TAGS:
        raise CatalogDecodeError("record tags: expected a short list")
    checks = v[8]
    if type(checks) is not list or len(checks) > MAX_CHECKS:
        raise CatalogDecodeError("record checks: expected a short list")
    summaries = []
    for c in checks:
        if type(c) is not list or len(c) != 3:
            raise CatalogDecodeError("a check summary is [id, kind, status]")
        summaries.append(CheckSummary(_str(c[0]), _str(c[1]), _status(c[2])))
    port = _uint(v[3])
    weight = _uint(v[6])
    if port > 65535 or weight > 65535:
        raise CatalogDecodeError("port or weight out of range")
    if type(v[10]) is not bool:
        raise CatalogDecodeError("record deleted flag: expected a boolean")
    name = _str(v[1])
    if not name:
        raise CatalogDecodeError("record without a service name")
    address = _str(v[2])
    if address and not valid_hostname(address):
        raise CatalogDecodeError("record address is neither an IP address nor a host name")
    return Record(_str(v[0]), name, address, port, tuple(_str(t) for t in tags),
                  _str(v[5]), weight, _status(v[7]), tuple(summaries), _uint(v[9]), v[10])


def _str(v: Any) -> str:
    if not valid_text(v, MAX_STR):
        raise CatalogDecodeError(f"expected short printable text, got {describe(v)}")
    return str(v)


def _node(v: Any) -> str:
    if not valid_name(v):
        raise CatalogDecodeError(f"expected a node name, got {describe(v)}")
    return str(v)


def _uint(v: Any) -> int:
    if not valid_counter(v):
        raise CatalogDecodeError(f"expected a counter from 0 to 2^53-1, got {describe(v)}")
    return int(v)


def _status(v: Any) -> str:
    if type(v) is not int or not 0 <= v < len(STATUSES):
        raise CatalogDecodeError("unknown status code")
    return STATUSES[v]


__all__ = [
    "CHANNEL",
    "SEVERITY",
    "SIGNED_CHANNEL",
    "SIGN_CONTEXT",
    "STATE_SHARE",
    "Catalog",
    "CatalogDecodeError",
    "CatalogLimitError",
    "CatalogLimits",
    "CheckSpec",
    "CheckSummary",
    "Identity",
    "Instance",
    "Record",
    "check_local_limits",
    "decode",
    "decode_set",
    "encode",
    "encode_set",
    "registration_size",
]
