"""The hook through which higher layers (catalog, policy) ride the gossip layer.

A delegate owns a channel name. Its broadcasts are piggybacked on gossip packets
(or sent over streams when too large), its state travels in every push-pull, and it
hears about member changes, all without the membership core knowing what it carries.
Delegates are sans-IO like the core: they are called synchronously with ``now``.
They never draw from the core's random generator: the core's draws must come in the
same order whatever delegates a node runs (the agent and the simulator run the same
ones, see ``assembly.py``, but the unit tests run bare cores).
"""

from __future__ import annotations

import math

from .effects import MemberEvent


class Delegate:
    """Base class with no-op defaults; override what the layer needs."""

    #: Unique channel name (e.g. ``"catalog"``), carried in every user message.
    channel: str = ""

    def local_state(self, join: bool) -> bytes:
        """State sent in a push-pull exchange (``b""`` for none)."""
        return b""

    def merge_remote_state(self, now: float, data: bytes, join: bool, peer: str) -> None:
        """Member ``peer``'s ``local_state`` arrived in a push-pull exchange. A delegate
        that exchanges digests answers with ``Membership.send_to(now, peer, ...)``."""

    def notify_message(self, now: float, payload: bytes) -> None:
        """A broadcast of this channel arrived (by datagram or stream)."""

    def notify_member(self, now: float, event: MemberEvent) -> None:
        """A member joined, changed, failed or left."""

    def state_digest(self) -> int:
        """A 64-bit hash of the state ``local_state`` shares (0: none), equal on two
        members exactly when they hold the same. Asked for on every datagram sent, so
        keep it incremental. Salt it with the channel, so two delegates' digests do
        not cancel out when the core folds them together."""
        return 0

    def handle_request(self, now: float, host: str, payload: bytes) -> bytes | None:
        """A peer at ``host`` asked this channel something by stream
        (``Membership.request``); the reply's payload, or None to close the stream."""
        return None

    def notify_reply(self, now: float, exchange: int, payload: bytes | None) -> None:
        """The reply to our ``Membership.request`` numbered ``exchange`` (None: the
        exchange failed, or the peer had nothing to say)."""

    def timer_deadline(self) -> float:
        """When ``on_timer`` must next run (the core's clock; inf: never). The core
        folds it into its own ``next_deadline``, so the agent and the simulator drive
        a delegate's timers like the protocol's."""
        return math.inf

    def on_timer(self, now: float) -> None:
        """Called from the core's ``tick`` once ``timer_deadline`` has passed."""
