"""The member snapshot's pure parts: the file format round-trips, anything else is
refused with ``SnapshotError`` only, the rejoin choice, and the write coalescing."""

from __future__ import annotations

import contextlib
import json
import math
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rumor.gossip.snapshot import (
    MAX_SNAPSHOT_BYTES,
    Remembered,
    Snapshot,
    SnapshotError,
    WriteSchedule,
    decode_snapshot,
    encode_snapshot,
    rejoin_batches,
)

names = st.text(st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp", "Zs", "Co",
                                                    "Cn", "Cf")), min_size=1, max_size=20)
ipv4 = st.tuples(*[st.integers(0, 255)] * 4).map(lambda t: ".".join(map(str, t)))
ipv6 = st.ip_addresses(v=6).map(lambda a: a.compressed)
addrs = st.tuples(st.one_of(ipv4, ipv6), st.integers(1, 65535))


@st.composite
def snapshots(draw: st.DrawFn) -> Snapshot:
    ms = draw(st.dictionaries(names, addrs, max_size=20))
    return Snapshot(draw(names), tuple(Remembered(n, a) for n, a in ms.items()),
                    draw(st.booleans()), draw(st.floats(0, 4e9)))


@given(snapshots())
def test_round_trip(snap: Snapshot) -> None:
    assert decode_snapshot(encode_snapshot(snap)) == snap


def test_the_file_is_readable_json() -> None:
    snap = Snapshot("web-1", (Remembered("web-2", ("10.0.0.2", 7946)),
                              Remembered("db", ("::1", 7950))), left=True, saved_at=5.0)
    doc = json.loads(encode_snapshot(snap))
    assert doc == {"version": 2, "node": "web-1", "left": True, "saved_at": 5.0,
                   "members": [{"name": "web-2", "addr": "10.0.0.2:7946"},
                               {"name": "db", "addr": "[::1]:7950"}]}


def test_version_2_keeps_bindings_and_version_1_files_still_read() -> None:
    snap = Snapshot("web-1", (Remembered("web-2", ("10.0.0.2", 7946), b"\x93cred"),))
    assert decode_snapshot(encode_snapshot(snap)) == snap
    assert '"credential": "k2NyZWQ="' in encode_snapshot(snap).decode()
    v1 = b'{"version": 1, "node": "a", "members": [{"name": "b", "addr": "1.2.3.4:5"}]}'
    assert decode_snapshot(v1).members == (Remembered("b", ("1.2.3.4", 5)),)
    with pytest.raises(SnapshotError, match="credential"):
        decode_snapshot(b'{"version": 2, "node": "a", "members": [{"name": "b", '
                        b'"addr": "1.2.3.4:5", "credential": "%%%"}]}')


@given(st.binary(max_size=300))
def test_random_bytes_raise_only_snapshot_error(data: bytes) -> None:
    with contextlib.suppress(SnapshotError):
        decode_snapshot(data)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=20)


@given(snapshots(), st.sampled_from(["version", "node", "left", "saved_at", "members"]),
       json_values)
def test_any_field_replaced_by_any_json_is_accepted_or_refused_cleanly(
        snap: Snapshot, key: str, value: object) -> None:
    doc = json.loads(encode_snapshot(snap))
    doc[key] = value
    try:
        decode_snapshot(json.dumps(doc).encode())
    except SnapshotError as e:
        assert str(e) and "\n" not in str(e)


@given(snapshots(), st.data())
def test_a_member_entry_mangled_is_refused_with_its_path(snap: Snapshot,
                                                         data: st.DataObject) -> None:
    doc = json.loads(encode_snapshot(snap))
    doc["members"].append({"name": "x", "addr": "10.0.0.1:7946"})
    bad = {"name": ["", "a\nb", "x" * 129, 7, None, [1]],
           "addr": ["", "10.0.0.1", "host:80", "10.0.0.1:0", "10.0.0.1:99999", "::1:80",
                    "[::1]", "1.2.3.4:-1", "1.2.3.4:+80", "[fe80::1%eth0]:80", 7, None]}
    field = data.draw(st.sampled_from(sorted(bad)))
    doc["members"][-1][field] = data.draw(st.sampled_from(bad[field]))
    with pytest.raises(SnapshotError, match=rf"members\[{len(doc['members']) - 1}\]"):
        decode_snapshot(json.dumps(doc).encode())


@given(snapshots(), st.integers(0, 2000))
def test_truncated_files_are_refused(snap: Snapshot, cut: int) -> None:
    data = encode_snapshot(snap)
    if cut >= len(data) or not data[:cut].strip():
        cut = len(data) // 2
    try:
        decode_snapshot(data[:cut])
    except SnapshotError:
        return
    # Cutting only trailing whitespace leaves the same snapshot.
    assert decode_snapshot(data[:cut]) == snap


@pytest.mark.parametrize("data,why", [
    (b"", "not JSON"), (b"\xff\xfe", "not UTF-8"), (b"[]", "expected a JSON object"),
    (b'{"version": 3, "node": "a"}', "version"), (b'{"version": 1}', "node"),
    (b'{"version": 1, "node": "a", "left": 1}', "left"),
    (b'{"version": 1, "node": "a", "saved_at": -1}', "saved_at"),
    (b'{"version": 1, "node": "a", "saved_at": NaN}', "saved_at"),
    (b'{"version": 1, "node": "a", "members": {}}', "members"),
    (b'{"version": 1, "node": "a", "members": [{"name": "b", "addr": "1.2.3.4:5"},'
     b' {"name": "b", "addr": "1.2.3.4:6"}]}', "twice"),
    (b"[" * 100_000, "not JSON"),
    (b'{"version": 1, "node": "a", "saved_at": 1' + b"0" * 5000 + b"}", "not JSON"),
])
def test_corrupt_files_name_what_is_wrong(data: bytes, why: str) -> None:
    with pytest.raises(SnapshotError, match=why):
        decode_snapshot(data)


def test_an_oversized_file_is_refused_before_parsing() -> None:
    with pytest.raises(SnapshotError, match="larger"):
        decode_snapshot(b" " * (MAX_SNAPSHOT_BYTES + 1))


def _snap(n: int, left: bool = False) -> Snapshot:
    return Snapshot("me", tuple(Remembered(f"m{i}", ("127.0.0.1", 7000 + i))
                                for i in range(n)), left)


def test_rejoin_batches_leave_out_ourselves_and_come_a_few_at_a_time() -> None:
    snap = Snapshot("me", (*_snap(7).members, Remembered("me", ("127.0.0.1", 9000)),
                           Remembered("old-name", ("127.0.0.1", 9999))))
    batches = rejoin_batches(snap, "me", ("127.0.0.1", 9999), random.Random(1))
    flat = [a for b in batches for a in b]
    assert sorted(flat) == [("127.0.0.1", 7000 + i) for i in range(7)]
    assert [len(b) for b in batches] == [3, 3, 1]


def test_rejoin_order_is_shuffled_and_seeded() -> None:
    orders = {tuple(a for b in rejoin_batches(_snap(8), "me", ("127.0.0.1", 1),
                                              random.Random(seed)) for a in b)
              for seed in range(10)}
    assert len(orders) > 5
    again = rejoin_batches(_snap(8), "me", ("127.0.0.1", 1), random.Random(3))
    assert again == rejoin_batches(_snap(8), "me", ("127.0.0.1", 1), random.Random(3))


def test_no_rejoin_after_a_graceful_leave_unless_asked() -> None:
    rng = random.Random(0)
    assert rejoin_batches(_snap(4, left=True), "me", ("127.0.0.1", 1), rng) == []
    assert len(rejoin_batches(_snap(4, left=True), "me", ("127.0.0.1", 1), rng,
                              rejoin_after_leave=True)) == 2
    assert rejoin_batches(_snap(0), "me", ("127.0.0.1", 1), rng) == []


def test_write_schedule_writes_at_once_then_coalesces() -> None:
    s = WriteSchedule(1.0)
    assert s.due_at() == math.inf
    s.changed()
    assert s.due_at() <= 0.0          # the first change: write now
    s.wrote(10.0)
    assert s.due_at() == math.inf
    s.changed()
    s.changed()
    assert s.due_at() == 11.0         # within the interval: one write at its end
    s.wrote(11.0)
    s.changed()
    assert s.due_at() == 12.0
    s.wrote(20.0)
    assert s.due_at() == math.inf
