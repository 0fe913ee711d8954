"""What the membership core asks its driver (the trio runtime or the simulator) to do.

The core never touches a socket or a clock; every call returns nothing and instead
appends effects that the driver drains with ``take_effects()`` and carries out.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .wire import Address, Meta, Status


@dataclass(frozen=True, slots=True)
class SendPacket:
    """Send ``data`` (already sealed) as one UDP datagram to ``addr``."""

    addr: Address
    data: bytes


@dataclass(frozen=True, slots=True)
class StreamRequest:
    """Open a stream to ``addr``, write one frame (``header`` then ``data``, both
    already sealed) and, if ``expect_reply``, read one frame back within ``timeout``
    seconds, asking ``Membership.frame_length`` how much to read. The driver reports
    the outcome with ``Membership.stream_reply(now, exchange, reply_body_or_None)``;
    one-way requests are reported too (``b""`` on success) so failures are counted."""

    exchange: int
    addr: Address
    data: bytes
    expect_reply: bool
    timeout: float
    header: bytes = b""


@dataclass(frozen=True, slots=True)
class StreamReply:
    """The frame to write back on a stream a peer opened: ``header`` then ``body``."""

    body: bytes
    header: bytes

    @property
    def frame(self) -> bytes:
        return self.header + self.body


@dataclass(frozen=True, slots=True)
class MemberEvent:
    """A change in what this node believes about a member.

    ``kind`` says what happened (``join``, ``alive`` after suspicion or failure,
    ``update`` of metadata, ``suspect``, ``failed``, ``left``, ``reap`` when forgotten);
    ``status`` is the member's status afterwards."""

    kind: str
    name: str
    status: int
    incarnation: int
    addr: Address
    meta: Meta = field(default_factory=dict)

    @property
    def status_name(self) -> str:
        return Status.NAMES[self.status]

    def to_json(self) -> dict[str, object]:
        return {"event": "member", "member": self.name, "status": self.status_name,
                "kind": self.kind, "incarnation": self.incarnation,
                "addr": f"{self.addr[0]}:{self.addr[1]}"}


@dataclass(frozen=True, slots=True)
class JoinFinished:
    """A ``join(seeds)`` command completed: ``contacted`` seeds answered (0 = failed)."""

    contacted: int
    errors: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class LeaveFinished:
    """The leave broadcast went out (or its deadline passed): safe to shut down."""


@dataclass(frozen=True, slots=True)
class Notice:
    """Something an operator should read (e.g. UDP blocked but TCP works). ``code`` is
    stable for machines; ``message`` is for people."""

    code: str
    message: str
    member: str | None = None


Effect = SendPacket | StreamRequest | MemberEvent | JoinFinished | LeaveFinished | Notice
