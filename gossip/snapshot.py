"""Restart memory: the members an agent knew, as a file it finds again after a restart.

Without it an agent that restarts knows nobody but the seeds on its command line, and
an agent started without seeds (or whose seeds are down) stays alone although the
cluster it left is still there. Serf keeps a snapshot of its members for this; so does
rumor, in ``--data-dir``. Serf appends every member event to a log and compacts it;
rumor's cluster tables are small (a 10,000-member snapshot is about 500 KiB), so it
rewrites the whole file instead, atomically and at most once per
``SNAPSHOT_INTERVAL`` (``WriteSchedule``), which needs no replay and no compaction.

The file is JSON, so an operator can read it::

    {"version": 2, "node": "web-1", "left": false, "saved_at": 1718000000.0,
     "members": [{"name": "web-2", "addr": "10.0.0.2:7946",
                  "credential": "<base64>"}, ...]}

Version 2 adds each member's node credential (``node_key.py``), the binding of its
name to its key: after a restart a name once seen signed is still never taken at its
unsigned word. Version 1 files (no credentials) are still read.

``left`` records a graceful leave: as in Serf, an agent that left on purpose does not
rejoin by itself at its next start (unless told to, ``--rejoin-after-leave``). Nothing
in the file is trusted: ``decode_snapshot`` checks every field as a gossip decoder does
(``fields.py``) and raises only ``SnapshotError``, and the members found are only seeds
to try, exactly like ``--join`` addresses.

This module is sans-IO: the trio shell that reads and writes the file and rejoins is
``rejoin.py``.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import random
from dataclasses import dataclass

from .address import format_address
from .fields import describe, ip_literal, valid_name, valid_port
from .wire import Address

VERSION = 2
#: Versions this code reads.
READABLE = (1, 2)
#: A file larger than this is not a snapshot (100,000 members fit in about 6 MiB).
MAX_SNAPSHOT_BYTES = 16 * 1024 * 1024
MAX_MEMBERS = 100_000
#: Members contacted at once when rejoining: a few, so that one dead member costs no
#: wait when others answer, without a push-pull with the whole remembered cluster.
REJOIN_BATCH = 3
#: At most one write per this many seconds, however fast the membership changes.
SNAPSHOT_INTERVAL = 1.0


class SnapshotError(ValueError):
    """The bytes are not a member snapshot; the message says what was wrong."""


@dataclass(frozen=True, slots=True)
class Remembered:
    """One member as the snapshot keeps it: enough to reach it again."""

    name: str
    addr: Address
    #: Its node credential's bytes, when it was bound to a key (version 2).
    credential: bytes | None = None


@dataclass(frozen=True, slots=True)
class Snapshot:
    #: The agent that wrote it (a data directory moved to another agent is noticed).
    node: str
    members: tuple[Remembered, ...] = ()
    #: The agent left gracefully after writing this.
    left: bool = False
    #: When it was written (Unix time), for the operator; 0: unknown.
    saved_at: float = 0.0


def encode_snapshot(snap: Snapshot) -> bytes:
    doc = {"version": VERSION, "node": snap.node, "left": snap.left,
           "saved_at": snap.saved_at,
           "members": [_member_doc(m) for m in snap.members]}
    return (json.dumps(doc, indent=1) + "\n").encode()


def decode_snapshot(data: bytes) -> Snapshot:
    """The snapshot in ``data``; raises ``SnapshotError`` naming the bad part."""
    if len(data) > MAX_SNAPSHOT_BYTES:
        raise SnapshotError(f"larger than {MAX_SNAPSHOT_BYTES >> 20} MiB")
    try:
        doc = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise SnapshotError("not UTF-8 text") from None
    except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise SnapshotError(f"not JSON ({_first_line(e)})") from None
    if not isinstance(doc, dict):
        raise SnapshotError(f"expected a JSON object, got {describe(doc)}")
    version = doc.get("version")
    if type(version) is not int or version not in READABLE:
        raise SnapshotError(f"version: expected 1 or {VERSION}, got "
                            f"{version if type(version) is int else describe(version)}")
    node = doc.get("node")
    if not valid_name(node):
        raise SnapshotError(f"node: expected a member name, got {describe(node)}")
    left = doc.get("left", False)
    if type(left) is not bool:
        raise SnapshotError(f"left: expected true or false, got {describe(left)}")
    saved_at = doc.get("saved_at", 0.0)
    if type(saved_at) not in (int, float) or not math.isfinite(saved_at) or saved_at < 0:
        raise SnapshotError(f"saved_at: expected a time, got {describe(saved_at)}")
    raw = doc.get("members", [])
    if not isinstance(raw, list):
        raise SnapshotError(f"members: expected a list, got {describe(raw)}")
    if len(raw) > MAX_MEMBERS:
        raise SnapshotError(f"members: {len(raw)} entries, at most {MAX_MEMBERS}")
    members: list[Remembered] = []
    seen: set[str] = set()
    for i, item in enumerate(raw):
        m = _member(item, f"members[{i}]")
        if m.name in seen:
            raise SnapshotError(f"members[{i}]: {m.name!r} is listed twice")
        seen.add(m.name)
        members.append(m)
    assert isinstance(node, str)  # valid_name checked it
    return Snapshot(node, tuple(members), left, float(saved_at))


def _member(item: object, where: str) -> Remembered:
    if not isinstance(item, dict):
        raise SnapshotError(f"{where}: expected an object, got {describe(item)}")
    name = item.get("name")
    if not valid_name(name):
        raise SnapshotError(f"{where}.name: expected a member name, got {describe(name)}")
    assert isinstance(name, str)
    cred = item.get("credential")
    raw: bytes | None = None
    if cred is not None:
        if type(cred) is not str or len(cred) > 2048:
            raise SnapshotError(f"{where}.credential: expected base64 text")
        try:
            raw = base64.b64decode(cred, validate=True)
        except (binascii.Error, ValueError):
            raise SnapshotError(f"{where}.credential: not base64") from None
    return Remembered(name, _address(item.get("addr"), f"{where}.addr"), raw)


def _member_doc(m: Remembered) -> dict[str, str]:
    doc = {"name": m.name, "addr": format_address(m.addr)}
    if m.credential is not None:
        doc["credential"] = base64.b64encode(m.credential).decode()
    return doc


def _address(text: object, where: str) -> Address:
    """An ``IP:PORT`` (``[IPv6]:PORT``) as members gossip it: IP literals only."""
    if type(text) is not str:
        raise SnapshotError(f"{where}: expected IP:PORT, got {describe(text)}")
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        host = ""  # IPv6 without brackets: ambiguous
    ip = ip_literal(host)
    if not sep or ip is None or not port.isdigit() or len(port) > 5 \
            or not valid_port(int(port)):
        raise SnapshotError(f"{where}: expected IP:PORT, got {describe(text)}")
    return (ip, int(port))


def _first_line(e: BaseException) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0][:120]


def rejoin_batches(snap: Snapshot, me: str, own: Address, rng: random.Random, *,
                   rejoin_after_leave: bool = False,
                   batch: int = REJOIN_BATCH) -> list[list[Address]]:
    """The remembered members to rejoin through, shuffled (so the agents of a cluster
    restarting together do not all ask the same member first), a few at a time; none
    when the agent left gracefully, unless ``rejoin_after_leave``. Our own name and
    address are left out: answering ourselves is not rejoining."""
    if snap.left and not rejoin_after_leave:
        return []
    addrs = [m.addr for m in snap.members if m.name != me and m.addr != own]
    rng.shuffle(addrs)
    step = max(1, batch)
    return [addrs[i:i + step] for i in range(0, len(addrs), step)]


class WriteSchedule:
    """When to write the snapshot: after a change, at most once per ``interval``
    seconds. The first change after a quiet spell is written at once; changes that
    follow within ``interval`` are coalesced into one write at its end."""

    def __init__(self, interval: float = SNAPSHOT_INTERVAL) -> None:
        self.interval = interval
        self._last = -math.inf
        self._dirty = False

    def changed(self) -> None:
        self._dirty = True

    def due_at(self) -> float:
        """When the next write is due (``inf``: nothing to write)."""
        return self._last + self.interval if self._dirty else math.inf

    def wrote(self, now: float) -> None:
        self._last = now
        self._dirty = False


__all__ = ["MAX_SNAPSHOT_BYTES", "REJOIN_BATCH", "SNAPSHOT_INTERVAL", "Remembered",
           "Snapshot", "SnapshotError", "WriteSchedule", "decode_snapshot",
           "encode_snapshot", "rejoin_batches"]
