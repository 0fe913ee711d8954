"""Policy replication over the real membership core on a virtual clock (FakeNet)."""

from __future__ import annotations

import contextlib
import time

from hypothesis import given, settings
from hypothesis import strategies as st

from rumor.gossip.config import LAN
from rumor.policy.envelope import make_payload, sign
from rumor.policy.keys import SecretKey
from rumor.policy.replication import (
    PolicyReplicator,
    ReplicationDecodeError,
    decode_message,
    decode_state,
    encode_state,
)
from rumor.policy.store import PolicyStore
from rumor.policy.trust import TrustSet

from ..fakenet import FakeNet

CFG = LAN.with_overrides(push_pull_interval=10.0)
KEY = SecretKey(b"\x07" * 32)
EPOCH = time.time()


def doc(name: str, version: int, padding: int = 0) -> bytes:
    body = (f'kind = "access"\nname = "{name}"\nversion = {version}\n'
            f'destination = "web"\ndefault = "allow"\n'
            + "".join(f"# {'x' * 70}\n" for _ in range(padding // 73))).encode()
    return sign(make_payload("access", name, version, EPOCH, None, body), [KEY]).encode()


def cluster(n: int) -> tuple[FakeNet, dict[str, PolicyReplicator]]:
    net = FakeNet(CFG)
    reps = {}
    for core in net.cluster(n):
        r = PolicyReplicator(core, PolicyStore(TrustSet.of([KEY.public])), wall_offset=EPOCH)
        core.register(r)
        reps[core.name] = r
    return net, reps


def holds(r: PolicyReplicator, name: str, version: int) -> bool:
    h = r.store.get(name)
    return h is not None and h.envelope.version == version


def test_small_and_large_documents_reach_everyone() -> None:
    net, reps = cluster(6)
    assert reps["n0"].publish(net.now, doc("small", 1)).accepted
    big = doc("big", 1, padding=20_000)  # far more than a datagram: goes by stream
    assert len(big) > 10_000
    assert reps["n3"].publish(net.now, big).accepted
    net.flush("n0")
    net.flush("n3")
    net.run_until(lambda: all(holds(r, "small", 1) and holds(r, "big", 1)
                              for r in reps.values()), 10)


def test_lost_broadcast_is_repaired_by_push_pull_digest() -> None:
    net, reps = cluster(4)
    # n3 hears no datagram at all: only the push-pull stream can bring it the document.
    net.drop_udp = lambda src, dst: dst == "n3"
    reps["n0"].publish(net.now, doc("web-access", 1))
    net.flush("n0")
    net.run_until(lambda: all(holds(r, "web-access", 1) for n, r in reps.items() if n != "n3"), 5)
    assert not holds(reps["n3"], "web-access", 1)
    net.run_until(lambda: holds(reps["n3"], "web-access", 1), 60)
    assert sum(r.stats["repair_envelopes_sent"] for r in reps.values()) >= 1


def test_forged_document_is_not_forwarded() -> None:
    net, reps = cluster(4)
    mallory = SecretKey(b"\x09" * 32)
    forged = sign(make_payload("access", "web-access", 9, EPOCH, None,
                               b'kind = "access"\nname = "web-access"\nversion = 9\n'
                               b'destination = "web"\ndefault = "allow"\n'),
                  [mallory]).encode()
    assert reps["n1"].publish(net.now, forged).reason == "untrusted"
    net.flush("n1")
    net.run(30)
    assert all(r.store.get("web-access") is None for r in reps.values())
    assert all(not r.store.rejections for n, r in reps.items() if n != "n1")


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=512))
def test_hostile_channel_bytes_raise_only_the_codec_error(data: bytes) -> None:
    for decode in (decode_message, decode_state):
        with contextlib.suppress(ReplicationDecodeError):  # anything else fails the test
            decode(data)


def test_digest_roundtrip() -> None:
    d = {"a": (3, b"\x01" * 32), "trust": (1, b"\x02" * 32)}
    assert decode_state(encode_state(d)) == d
