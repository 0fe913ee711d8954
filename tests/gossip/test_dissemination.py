"""Dissemination: delegate broadcasts by datagram and by stream, fair packet shares."""

from __future__ import annotations

import random

import pytest

from rumor.gossip.config import LAN
from rumor.gossip.delegate import Delegate
from rumor.gossip.membership import Membership
from rumor.gossip.wire import (
    decode_packet,
)

from ..fakenet import FakeNet

CFG = LAN.with_overrides(reconnect_interval=5.0)


class _Echo(Delegate):
    """Re-broadcasts what is new to it, as real delegates (catalog, policy) do."""

    channel = "echo"

    def __init__(self, core: Membership | None = None) -> None:
        self.core = core
        self.got: list[bytes] = []
        self.state = b""
        self.merged: list[bytes] = []

    def notify_message(self, now: float, payload: bytes) -> None:
        if payload not in self.got and self.core is not None:
            self.core.broadcast(now, self.channel, payload, key=payload[:8].hex())
        self.got.append(payload)

    def local_state(self, join: bool) -> bytes:
        return self.state

    def merge_remote_state(self, now: float, data: bytes, join: bool, peer: str) -> None:
        self.merged.append(data)


def test_delegate_broadcasts_small_and_large_and_push_pull_state() -> None:
    net = FakeNet(CFG.with_overrides(push_pull_interval=5.0))
    cores = net.cluster(4)
    ds = {}
    for c in cores:
        d = _Echo(c)
        c.register(d)
        ds[c.name] = d
    ds["n0"].state = b"state-of-n0"
    cores[0].broadcast(net.now, "echo", b"small")
    cores[0].broadcast(net.now, "echo", b"L" * 5000)  # too big for a datagram
    net.flush("n0")
    net.run(12)
    assert all(b"small" in ds[n].got for n in ("n1", "n2", "n3"))
    # Large messages go by stream to gossip_nodes members (3 of 3 here).
    assert all(b"L" * 5000 in ds[n].got for n in ("n1", "n2", "n3"))
    assert any(b"state-of-n0" in ds[n].merged for n in ("n1", "n2", "n3"))
    with pytest.raises(ValueError):
        cores[0].register(_Echo())


def test_application_broadcasts_get_a_fair_share_of_packets() -> None:
    c = Membership("me", ("10.0.0.1", 1), CFG, random.Random(1))
    from rumor.gossip.wire import Alive
    for i in range(200):  # flood the membership queue
        c._on_alive(0.0, Alive(1, f"member-with-a-long-name-{i:04d}", ("10.0.0.9", i), {}))
    c.register(_Echo())
    c.broadcast(0.0, "echo", b"x" * 100)
    c.take_effects()
    c._send(0.0, ("10.0.0.2", 1), "peer", [])
    (pkt,) = [e for e in c.take_effects() if hasattr(e, "data")]
    msgs = decode_packet(pkt.data)  # type: ignore[union-attr]
    assert any(getattr(m, "channel", None) == "echo" for m in msgs)
    assert len(pkt.data) <= CFG.max_datagram  # type: ignore[union-attr]
