"""The delay line's parts that need no root: the NFQUEUE wire format (against messages
laid out by hand from nfnetlink_queue.h), id bookkeeping, the verdict batching, the
iptables rules and the command line."""

from __future__ import annotations

import random
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rumor.simulations.lab import nfqueue
from rumor.simulations.lab.delay_line import _Line, delay_rules, parse_queue_arg
from rumor.simulations.lab.delay_schedule import DelaySchedule
from rumor.simulations.lab.nfqueue import NfQueue, NfQueueError, QueueCounters, netns_path
from rumor.simulations.network import Fixed, Uniform

IP = bytes.fromhex("4500005ca58e400040118b580ad3fa010ad3fa02")


def attr(kind: int, payload: bytes) -> bytes:
    n = 4 + len(payload)
    return struct.pack("=HH", n, kind) + payload + b"\0" * ((4 - n % 4) % 4)


def packet_msg(packet_id: int, payload: bytes = IP, *, extra: bytes = b"") -> bytes:
    """A NFQNL_MSG_PACKET as the kernel lays it out: header first, payload last."""
    body = (bytes((2, 0)) + struct.pack(">H", 5)  # nfgenmsg: AF_INET, v0, queue 5
            + attr(1 | 0x4000, struct.pack(">IHB", packet_id, 0x0800, 4))  # NET_BYTEORDER
            + extra + attr(6, struct.pack(">I", 2)) + attr(10, payload))
    return struct.pack("=IHHII", 16 + len(body), (3 << 8) | 0, 0, 0, 0) + body


def error_msg(seq: int, code: int) -> bytes:
    body = struct.pack("=i", -code) + struct.pack("=IHHII", 16, 0, 0, seq, 0)
    return struct.pack("=IHHII", 16 + len(body), 2, 0, seq, 0) + body


def bare_queue(queue_num: int = 5) -> NfQueue:
    """An NfQueue without a socket: only the parsing and encoding are exercised."""
    q = object.__new__(NfQueue)
    q.counters = QueueCounters()
    q._last_id = 0
    q._nfgen = bytes((0, 0)) + queue_num.to_bytes(2, "big")
    return q


def test_packet_messages_parse_to_id_and_payload() -> None:
    q = bare_queue()
    out: list[tuple[int, bytes]] = []
    data = packet_msg(1) + packet_msg(2, IP[:13]) + packet_msg(3, extra=attr(14, b"\0" * 4))
    assert q._parse(memoryview(data), out, None) is None
    assert out == [(1, IP), (2, IP[:13]), (3, IP)]
    assert q.counters.packets == 3 and q.counters.missed == 0


def test_gaps_in_ids_are_missed_packets_and_ids_unwrap() -> None:
    q = bare_queue()
    out: list[tuple[int, bytes]] = []
    q._parse(memoryview(packet_msg(1) + packet_msg(4)), out, None)
    assert [i for i, _ in out] == [1, 4] and q.counters.missed == 2
    q._last_id = 0xFFFFFFFE
    out.clear()
    q._parse(memoryview(packet_msg(0xFFFFFFFF) + packet_msg(0) + packet_msg(1)), out, None)
    assert [i for i, _ in out] == [0xFFFFFFFF, 0x100000000, 0x100000001]
    assert q.counters.missed == 2 and q.last_id == 0x100000001


def test_acks_and_errors() -> None:
    q = bare_queue()
    out: list[tuple[int, bytes]] = []
    # A packet can arrive before the ack of a config message: kept, and the ack found.
    assert q._parse(memoryview(packet_msg(1) + error_msg(7, 0)), out, 7) == 0
    assert len(out) == 1
    assert q._parse(memoryview(error_msg(8, 1)), out, 8) == 1  # EPERM
    # An error for a verdict (no ack asked for) is counted, not raised.
    assert q._parse(memoryview(error_msg(0, 2)), out, None) is None
    assert q.counters.verdict_errors == 1


@given(st.binary(max_size=300))
def test_garbage_never_raises(data: bytes) -> None:
    q = bare_queue()
    q._parse(memoryview(data), [], None)


def test_verdict_layout() -> None:
    q = bare_queue(queue_num=0x0102)
    msg = q._verdict(nfqueue._VERDICT_TYPE, 0x1_0000_0007, nfqueue.NF_ACCEPT)
    length, kind, flags, seq, pid = struct.unpack_from("=IHHII", msg)
    assert (length, kind, flags, seq, pid) == (32, 0x0301, 1, 0, 0) and len(msg) == 32
    assert msg[16:20] == bytes((0, 0, 1, 2))  # AF_UNSPEC, v0, queue 0x0102 big-endian
    assert struct.unpack_from("=HH", msg, 20) == (12, 2)  # NFQA_VERDICT_HDR
    assert struct.unpack_from(">II", msg, 24) == (1, 7)  # ACCEPT, low 32 bits of the id
    batch = q._verdict(nfqueue._BATCH_TYPE, 9, nfqueue.NF_ACCEPT)
    assert struct.unpack_from("=H", batch, 4)[0] == 0x0303


def test_config_attributes_are_aligned() -> None:
    a = nfqueue._attr(nfqueue.NFQA_CFG_PARAMS, struct.pack(">IB", 40, 2))
    assert struct.unpack_from("=HH", a) == (9, 2) and len(a) == 12


def test_netns_paths() -> None:
    assert netns_path("rl-h01") == "/run/netns/rl-h01"
    assert netns_path("/proc/1/ns/net") == "/proc/1/ns/net"
    for bad in ("", "a/b"):
        with pytest.raises(NfQueueError):
            netns_path(bad)


# -- batching --------------------------------------------------------------------------

class FakeQueue:
    def __init__(self) -> None:
        self.calls: list[tuple[int | None, list[int]]] = []

    def send_verdicts(self, batch_up_to: int | None, ids: list[int] | tuple[int, ...]
                      ) -> None:
        self.calls.append((batch_up_to, list(ids)))


def make_line() -> tuple[_Line, FakeQueue]:
    fake = FakeQueue()
    spec = parse_queue_arg("ns:1:fixed:0")
    line = _Line(spec, fake, DelaySchedule(Fixed(0), random.Random(0)))  # type: ignore[arg-type]
    return line, fake


def test_in_order_releases_are_one_batch_verdict() -> None:
    line, fake = make_line()
    line.held.extend(range(1, 11))
    line.release([1, 2, 3, 4])
    assert fake.calls == [(4, [])]
    line.release(list(range(5, 11)))
    assert fake.calls[-1] == (10, []) and line.holding == 0


def test_out_of_order_releases_never_batch_past_a_held_packet() -> None:
    line, fake = make_line()
    line.held.extend(range(1, 8))
    line.release([3, 5])  # 1, 2 still held: singles
    assert fake.calls == [(None, [3, 5])]
    line.release([1, 2, 6])  # 1..3 now done, 4 held: batch to 2 (3 again, harmless), 6 single
    assert fake.calls[-1] == (2, [6])
    assert line.holding == 2  # 4 and 7


@given(st.lists(st.tuples(st.floats(0, 0.01), st.integers(0, 3)), min_size=1, max_size=60),
       st.integers(0, 1000))
def test_batching_releases_exactly_the_due_ids(arrivals: list[tuple[float, int]],
                                               seed: int) -> None:
    """Whatever the order of releases, the verdicts sent cover every released id and
    never an id still held (a batch verdict covers every id up to its own)."""
    line, fake = make_line()
    sched = DelaySchedule(Uniform(0, 0.02), random.Random(seed))
    now, times = 0.0, []
    for i, (gap, dest) in enumerate(arrivals, start=1):
        now += gap
        line.held.append(i)
        times.append((sched.release(now, bytes([dest])), i))
    times.sort()
    done: set[int] = set()
    for k in range(0, len(times), 3):  # release in groups of three, in time order
        ids = [i for _, i in times[k:k + 3]]
        fake.calls.clear()
        line.release(ids)
        done.update(ids)
        (batch, singles), = fake.calls
        covered = set(singles) | (set(range(1, batch + 1)) if batch else set())
        assert set(ids) <= covered <= done
    assert line.holding == 0


# -- rules and command line ------------------------------------------------------------

def test_delay_rules() -> None:
    rules = delay_rules("veth-h01", 7)
    assert [do[0] for do, _ in rules] == ["iptables-legacy", "ip6tables-legacy"]
    do, undo = rules[0]
    assert do == ["iptables-legacy", "-t", "mangle", "-A", "PREROUTING", "-i", "veth-h01",
                  "-j", "NFQUEUE", "--queue-num", "7", "--queue-bypass"]
    assert undo == [*do[:3], "-D", *do[4:]]
    (do6, _), = delay_rules("veth-h01", 7, direction="egress")[1:]
    assert do6 == ["ip6tables-legacy", "-t", "mangle", "-A", "POSTROUTING", "-o",
                   "veth-h01", "-j", "NFQUEUE", "--queue-num", "7", "--queue-bypass"]
    for bad_iface, num in (("", 1), ("a b", 1), ("x" * 16, 1), ("eth0", 70000)):
        with pytest.raises(ValueError):
            delay_rules(bad_iface, num)
    with pytest.raises(ValueError, match="direction"):
        delay_rules("eth0", 1, direction="both")


def test_queue_args() -> None:
    q = parse_queue_arg("rl-h01:3:uniform:0.015:0.025")
    assert (q.netns, q.queue_num, q.spec, q.latency) == ("rl-h01", 3, "uniform:0.015:0.025",
                                                         Uniform(0.015, 0.025))
    assert parse_queue_arg(".:0:fixed:0").netns is None
    for bad in ("rl-h01:fixed:0.02", "rl-h01:x:fixed:0", "rl-h01:70000:fixed:0", ":1:fixed:0",
                "rl-h01:1:fixed:-1"):
        with pytest.raises(ValueError, match="bad"):
            parse_queue_arg(bad)
