"""The broadcast queue: retransmit limits, least-sent first, replacement, bounds."""

from __future__ import annotations

from rumor.gossip.config import LAN, LOCAL
from rumor.gossip.queue import BroadcastQueue

CFG = LAN.with_overrides(reconnect_interval=5.0)


def test_queue_retransmit_limit_and_least_sent_first() -> None:
    q = BroadcastQueue()
    q.push(b"a" * 10, "a")
    assert q.take(100, limit=3) == [b"a" * 10]
    q.push(b"b" * 10, "b")
    # b was never sent: it goes first.
    assert q.take(15, limit=3) == [b"b" * 10]
    assert q.take(100, limit=3) == [b"b" * 10, b"a" * 10]
    assert q.take(100, limit=3) == [b"b" * 10, b"a" * 10]  # a hits its limit here
    assert q.take(100, limit=3) == []
    assert len(q) == 0


def test_queue_newer_update_replaces_older_and_capacity_is_bounded() -> None:
    q = BroadcastQueue(max_items=3)
    q.push(b"old-x", "x")
    q.push(b"new-x", "x")
    assert len(q) == 1 and q.take(100, 5) == [b"new-x"]
    q.push(b"y", "y")
    q.push(b"z", "z")
    q.push(b"w", None)
    assert len(q) == 3 and q.dropped == 1
    assert b"new-x" not in q.take(100, 5), "the most-sent item is dropped first"


def test_retransmit_limit_formula() -> None:
    assert LAN.retransmit_limit(1) == 4
    assert LAN.retransmit_limit(9) == 4
    assert LAN.retransmit_limit(10) == 8
    assert LAN.retransmit_limit(1000) == 16
    assert LAN.suspicion_min(10) == 4.0
    assert LAN.suspicion_max(100) == 48.0
    assert LAN.push_pull_period(32) == 30.0
    assert LAN.push_pull_period(64) == 60.0
    assert LOCAL.probe_interval < LAN.probe_interval
