"""What one node knows about one member."""

from __future__ import annotations

from dataclasses import dataclass, field

from .node_key import Credential
from .wire import Address, MemberState, Meta, SignedAlive, SignedLeave, Status


@dataclass(slots=True)
class Member:
    name: str
    addr: Address
    incarnation: int
    status: int
    #: Time of the last status change (the core's clock).
    since: float
    meta: Meta = field(default_factory=dict)
    #: Smoothed round-trip time of direct probes (seconds), like TCP's SRTT.
    rtt: float | None = None
    rtt_last: float | None = None
    #: The credential binding this name to a node key, once one verified: from then on
    #: only the member's signed word changes its address, tags or incarnation, and no
    #: accusation may carry an incarnation above the one it signed (``identity.py``).
    cred: Credential | None = None
    #: The member's latest verified statement (an alive, or its leave), kept to pass
    #: on in push-pull; shared with every node that verified the same bytes.
    signed: SignedAlive | SignedLeave | None = None

    RTT_ALPHA = 0.2

    def observe_rtt(self, sample: float) -> None:
        self.rtt_last = sample
        self.rtt = sample if self.rtt is None else self.rtt + self.RTT_ALPHA * (sample - self.rtt)

    @property
    def live(self) -> bool:
        """Alive or suspect: still probed, still a gossip target."""
        return self.status in (Status.ALIVE, Status.SUSPECT)

    def state(self) -> MemberState:
        return MemberState(self.name, self.addr, self.incarnation, self.status, self.meta)
