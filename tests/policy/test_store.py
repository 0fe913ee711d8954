"""Keys, envelopes, trust and the acceptance rules of the policy store (sans-IO)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rumor.policy.envelope import (
    CONTEXT,
    MAX_ENVELOPE,
    EnvelopeError,
    Signature,
    decode_envelope,
    encode_envelope,
    make_payload,
    read_envelope_file,
    sign,
)
from rumor.policy.keys import (
    KeyFileError,
    SecretKey,
    load_public_key,
    load_secret_key,
    parse_public_key,
    write_keypair,
)
from rumor.policy.persist import PolicyDirectory
from rumor.policy.store import (
    ACCEPTED,
    DUPLICATE,
    MAX_RECENT_REJECTIONS,
    REJECTED,
    PolicyStore,
)
from rumor.policy.trust import TrustError, TrustSet

NOW = 1_800_000_000.0
K1, K2, K3, K4 = (SecretKey(bytes([i]) * 32) for i in range(1, 5))


def access_doc(name: str = "web-access", version: int = 1, allow: str = "api") -> bytes:
    return (f'kind = "access"\nname = "{name}"\nversion = {version}\n'
            f'destination = "web"\ndefault = "deny"\nallow = ["{allow}"]\n').encode()


def envelope(body: bytes, keys: list[SecretKey], *, version: int | None = None,
             name: str = "web-access", kind: str = "access", issued: float = NOW - 10,
             expires: float | None = None) -> bytes:
    v = version if version is not None else 1
    payload = make_payload(kind, name, v, issued, expires, body)
    return sign(payload, keys).encode()


def doc(version: int = 1, keys: list[SecretKey] | None = None, **kw: object) -> bytes:
    allow = str(kw.pop("allow", "api"))
    return envelope(access_doc(version=version, allow=allow), keys or [K1],
                    version=version, **kw)  # type: ignore[arg-type]


def trust_doc(version: int, new: list[SecretKey], threshold: int,
              signers: list[SecretKey]) -> bytes:
    keys = ", ".join(f'"{k.public.line()}"' for k in new)
    body = (f'kind = "trust"\nname = "trust"\nversion = {version}\n'
            f"keys = [{keys}]\nthreshold = {threshold}\n").encode()
    return envelope(body, signers, version=version, name="trust", kind="trust")


def store(*keys: SecretKey, threshold: int = 1) -> PolicyStore:
    return PolicyStore(TrustSet.of([k.public for k in keys or (K1,)], threshold))


# ---- keys ----------------------------------------------------------------------------


def test_keygen_files_and_modes(tmp_path: Path) -> None:
    secret, public, pk = write_keypair(tmp_path / "ops")
    assert stat.S_IMODE(os.stat(secret).st_mode) == 0o600
    assert load_public_key(public) == pk == load_secret_key(secret).public
    assert len(pk.id) == 16
    with pytest.raises(KeyFileError, match="exists"):
        write_keypair(tmp_path / "ops")
    with pytest.raises(KeyFileError, match="secret key"):
        parse_public_key(load_secret_key(secret).line())
    with pytest.raises(KeyFileError, match="does not match"):
        parse_public_key(pk.line()[:-1] + ("0" if pk.line()[-1] != "0" else "1"))
    (tmp_path / "bad.pub").write_text("rumor-ed25519 !!!! abc\n")
    with pytest.raises(KeyFileError, match=r"bad\.pub"):
        load_public_key(tmp_path / "bad.pub")


# ---- envelopes -----------------------------------------------------------------------


def test_sign_verify_roundtrip_and_file_form() -> None:
    data = doc(keys=[K1, K2])
    env = decode_envelope(data)
    assert env.name == "web-access" and env.version == 1 and env.kind == "access"
    assert env.key_ids() == [K1.public.id, K2.public.id]
    assert TrustSet.of([K1.public, K2.public], 2).verify(env).ok
    assert read_envelope_file(env.to_file()) == env
    assert read_envelope_file(data) == env
    # Co-signing adds a signature without touching the payload.
    env3 = sign(env.payload, [K3, K1], env.signatures)
    assert env3.payload == env.payload and len(env3.signatures) == 3


def test_signatures_cover_the_payload_bytes_as_carried() -> None:
    env = decode_envelope(doc())
    t = TrustSet.of([K1.public])
    # Flip one byte of the TOML inside the payload: the signature no longer verifies.
    tampered = env.payload.replace(b'allow = ["api"]', b'allow = ["apj"]')
    assert tampered != env.payload
    forged = decode_envelope(encode_envelope(tampered, env.signatures))
    assert not t.verify(forged).ok
    # A signature over the bare payload (no context string) is not a policy signature.
    bare = Signature(K1.public.id, K1.sign(env.payload))
    assert not t.verify(decode_envelope(encode_envelope(env.payload, (bare,)))).ok
    assert t.verify(decode_envelope(encode_envelope(
        env.payload, (Signature(K1.public.id, K1.sign(CONTEXT + env.payload)),)))).ok


@pytest.mark.parametrize("mutate, message", [
    (lambda d: b"\xc1" + d, "msgpack"),
    (lambda d: msgpack.packb([2, b"x", []]), "format"),
    (lambda d: msgpack.packb([1, "text", [["a" * 16, b"x" * 64]]]), "bytes"),
    (lambda d: msgpack.packb([1, b"x", []]), "1 to"),
    (lambda d: msgpack.packb([1, b"x", [["zz", b"x" * 64]]]), "hex"),
    (lambda d: msgpack.packb([1, b"x", [["a" * 16, b"x" * 63]]]), "64 bytes"),
    (lambda d: b"\x00" * (MAX_ENVELOPE + 1), "limit"),
])
def test_malformed_envelopes(mutate: object, message: str) -> None:
    with pytest.raises(EnvelopeError, match=message):
        decode_envelope(mutate(doc()))  # type: ignore[operator]


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.one_of(
    st.binary(max_size=2048),
    st.builds(lambda p, s: msgpack.packb([1, p, s]),
              st.binary(max_size=256),
              st.lists(st.lists(st.one_of(st.text(max_size=20), st.binary(max_size=70)),
                                max_size=3), max_size=3)),
    st.builds(lambda items: msgpack.packb(
        [1, msgpack.packb(items), [["a" * 16, b"x" * 64]]]),
        st.lists(st.one_of(st.integers(-2**63, 2**64 - 1), st.floats(), st.text(max_size=10),
                           st.binary(max_size=10), st.none(), st.booleans()), max_size=8)),
))
def test_hostile_envelopes_only_ever_get_rejected(data: bytes) -> None:
    s = store()
    out = s.offer(NOW, data)
    assert out.status == REJECTED and out.reason in ("malformed", "untrusted", "oversized")
    assert not s.held


@settings(max_examples=150, deadline=None)
@given(st.integers(0, 400), st.integers(0, 255))
def test_any_flipped_byte_is_rejected(pos: int, value: int) -> None:
    data = bytearray(doc())
    pos %= len(data)
    if data[pos] == value:
        return
    data[pos] = value
    s = store()
    out = s.offer(NOW, bytes(data))
    assert out.status == REJECTED, out
    assert not s.held


# ---- acceptance rules ----------------------------------------------------------------


def test_accept_duplicate_newer_and_rollback() -> None:
    s = store()
    assert s.offer(NOW, doc(1)).status == ACCEPTED
    assert s.offer(NOW, doc(1)).status == DUPLICATE
    v2 = doc(2)
    assert s.offer(NOW, v2).status == ACCEPTED
    old = s.offer(NOW, doc(1))
    assert (old.status, old.reason) == (REJECTED, "stale")
    assert s.offer(NOW, v2).status == DUPLICATE  # replay of the held one is harmless
    assert s.get("web-access").envelope.version == 2  # type: ignore[union-attr]
    assert s.rejections == {"stale": 1}


def test_recent_rejections_are_bounded_distinct_and_newest_first() -> None:
    s = store()
    assert s.offer(NOW, doc(2)).accepted
    for _ in range(3):  # gossip re-delivers the same stale copy: one entry, counted
        s.offer(NOW + 1, doc(1), origin="gossip")
    (stale,) = s.recent_rejections()
    assert (stale["reason"], stale["name"], stale["kind"], stale["version"]) == \
        ("stale", "web-access", "access", 1)
    assert (stale["count"], stale["at"], stale["last"], stale["origin"]) == \
        (3, NOW + 1, NOW + 1, "gossip")
    s.offer(NOW + 2, b"junk", origin="api")
    assert [r["reason"] for r in s.recent_rejections()] == ["malformed", "stale"]
    for i in range(MAX_RECENT_REJECTIONS):  # distinct documents by a key not trusted
        name = f"d{i}"
        s.offer(NOW + 3 + i, envelope(access_doc(name=name), [K3], name=name),
                origin=f"peer{i}")
    recent = s.recent_rejections()
    assert len(recent) == MAX_RECENT_REJECTIONS
    assert recent[0]["name"] == f"d{MAX_RECENT_REJECTIONS - 1}"  # newest first
    assert {r["reason"] for r in recent} == {"untrusted"}  # the oldest two fell out
    assert s.rejections == {"stale": 3, "malformed": 1,  # the counters are unchanged
                            "untrusted": MAX_RECENT_REJECTIONS}


def test_wrong_key_below_threshold_and_expired() -> None:
    s = store(K1, K2, threshold=2)
    one = s.offer(NOW, doc(keys=[K1]))
    assert (one.reason, "1 of 2") == ("untrusted", one.detail[:6])
    twice = s.offer(NOW, envelope(access_doc(), [K1]) )
    assert twice.reason == "untrusted"
    wrong = s.offer(NOW, doc(keys=[K3, K4]))
    assert wrong.reason == "untrusted" and "untrusted key" in wrong.detail
    expired = s.offer(NOW, doc(keys=[K1, K2], expires=NOW - 1))
    assert expired.reason == "expired"
    assert s.offer(NOW, doc(keys=[K1, K2], expires=NOW + 60)).accepted
    assert s.expire(NOW + 61) and not s.held


def test_same_key_twice_counts_once() -> None:
    env = decode_envelope(doc(keys=[K1]))
    dup = decode_envelope(encode_envelope(env.payload, env.signatures * 2))
    assert not store(K1, K2, threshold=2).offer_envelope(NOW, dup).accepted


def test_invalid_document_and_header_mismatch() -> None:
    s = store()
    bad = envelope(b'kind = "access"\nname = "web-access"\nversion = 1\n', [K1])
    out = s.offer(NOW, bad)
    assert out.reason == "invalid" and "destination" in out.detail
    other = envelope(access_doc(name="other"), [K1])
    assert "header says" in s.offer(NOW, other).detail


def test_equivocation_is_resolved_the_same_way_everywhere() -> None:
    a, b = doc(3, allow="api"), doc(3, allow="batch")
    s1, s2 = store(), store()
    assert s1.offer(NOW, a).accepted and s2.offer(NOW, b).accepted
    r1, r2 = s1.offer(NOW, b), s2.offer(NOW, a)
    assert r1.conflict and r2.conflict
    assert s1.digest() == s2.digest()
    assert s1.conflicts[0]["winner"] == s2.conflicts[0]["winner"]
    assert {r1.status, r2.status} == {ACCEPTED, REJECTED}


@settings(max_examples=60, deadline=None)
@given(st.permutations(list(range(7))))
def test_arrival_order_does_not_matter(order: list[int]) -> None:
    docs = [doc(1), doc(2, allow="x"), doc(2, allow="y"), doc(4), doc(3),
            envelope(access_doc(name="b", version=1), [K1], name="b"),
            envelope(access_doc(name="b", version=1, allow="z"), [K1], name="b")]
    s = store()
    for i in order:
        s.offer(NOW, docs[i])
    ref = store()
    for d in docs:
        ref.offer(NOW, d)
    assert s.digest() == ref.digest()


def test_log_once_per_document_and_reason() -> None:
    s = store()
    bad = doc(keys=[K3])
    assert s.offer(NOW, bad).first
    assert not s.offer(NOW, bad).first
    assert s.rejections["untrusted"] == 2


def test_trust_config_errors() -> None:
    with pytest.raises(TrustError):
        TrustSet.of([], 1)
    with pytest.raises(TrustError, match="between 1 and 1"):
        TrustSet.of([K1.public, K1.public], 2)


# ---- trust rotation ----------------------------------------------------------------


def test_rotation_needs_both_thresholds_and_revokes_old_signers() -> None:
    s = store(K1, K2, threshold=2)
    assert s.offer(NOW, doc(keys=[K1, K2])).accepted
    # Old keys alone, or new keys alone, are not enough.
    assert s.offer(NOW, trust_doc(1, [K3, K4], 2, [K1, K2])).reason == "untrusted"
    assert s.offer(NOW, trust_doc(1, [K3, K4], 2, [K3, K4])).reason == "untrusted"
    out = s.offer(NOW, trust_doc(1, [K3, K4], 2, [K1, K2, K3, K4]))
    assert out.accepted and s.trust.version == 1 and set(s.trust.keys) == {
        K3.public.id, K4.public.id}
    # What only the old keys signed is dropped: rotating out a stolen key cancels its work.
    assert [h.envelope.name for h in out.revoked] == ["web-access"]
    assert s.offer(NOW, doc(2, keys=[K1, K2])).reason == "untrusted"
    assert s.offer(NOW, doc(2, keys=[K3, K4])).accepted


def test_trust_chain_out_of_order_and_repair_order() -> None:
    t1 = trust_doc(1, [K2], 1, [K1, K2])
    t2 = trust_doc(2, [K3], 1, [K2, K3])
    late = store()
    assert late.offer(NOW, t2).reason == "untrusted"  # waits for its predecessor
    assert late.offer(NOW, t1).accepted
    assert late.trust.version == 2 and list(late.trust.keys) == [K3.public.id]
    # A peer that knows nothing is sent the chain, oldest link first.
    assert [e.version for e in late.missing_for({})] == [1, 2]
    fresh = store()
    for e in late.missing_for(fresh.digest()):
        assert fresh.offer_envelope(NOW, e).accepted
    assert fresh.trust == late.trust


# ---- persistence ---------------------------------------------------------------------


def test_directory_roundtrip_and_set_aside(tmp_path: Path) -> None:
    d = PolicyDirectory(tmp_path)
    env = decode_envelope(doc())
    path = d.save(env)
    assert [(p, b) for p, b in d.load()] == [(path, env.encode())]
    path.write_bytes(path.read_bytes()[:-3] + b"xyz")
    s = store()
    (p, data), = d.load()
    assert data is not None and s.offer(NOW, data).status == REJECTED
    moved = d.set_aside(p)
    assert moved.parent == d.rejected_dir and not p.exists() and d.load() == []


# --- fault documents: a bounded lifetime, checked at acceptance (issue 28) ----------

def fault_body(expires: str = "2030-01-01T00:00:00Z") -> bytes:
    return (f'kind = "fault"\nname = "web-fault"\nversion = 1\nexpires = {expires}\n'
            'service = "web"\n[[rule]]\nabort = { status = 503, percent = 50.0 }\n').encode()


def fault_envelope(lifetime: float | None, issued: float = NOW - 10) -> bytes:
    return envelope(fault_body(), [K1], name="web-fault", kind="fault", issued=issued,
                    expires=None if lifetime is None else issued + lifetime)


def test_a_fault_document_living_over_24h_is_rejected_at_acceptance() -> None:
    from rumor.policy.documents import MAX_FAULT_LIFETIME

    s = PolicyStore(TrustSet.of([K1.public]))
    out = s.offer(NOW, fault_envelope(MAX_FAULT_LIFETIME + 1))
    assert out.status == REJECTED and out.reason == "invalid"
    assert "a fault document must expire at most 24h after it is signed" in out.detail
    assert "24.00h after it was signed" in out.detail
    assert s.rejections["invalid"] == 1 and "web-fault" not in s.held
    out = s.offer(NOW, fault_envelope(None))
    assert out.reason == "invalid" and "no expiry" in out.detail
    assert s.rejections["invalid"] == 2
    assert s.offer(NOW, fault_envelope(MAX_FAULT_LIFETIME)).accepted  # exactly 24h: fine
    # Other kinds may live as long as they like.
    assert s.offer(NOW, doc(keys=[K1], expires=NOW + 10 * MAX_FAULT_LIFETIME)).accepted


def test_an_overlong_fault_is_never_relayed() -> None:
    from rumor.gossip.config import LAN
    from rumor.policy.replication import PolicyReplicator

    from ..fakenet import FakeNet

    net = FakeNet(LAN.with_overrides(push_pull_interval=10.0))
    reps = []
    for core in net.cluster(3):
        r = PolicyReplicator(core, PolicyStore(TrustSet.of([K1.public])), wall_offset=NOW)
        core.register(r)
        reps.append(r)
    bad = fault_envelope(48 * 3600.0, issued=NOW + net.now)
    assert reps[0].publish(net.now, bad).reason == "invalid"
    net.flush(reps[0].core.name)
    net.run(30)
    assert all(r.store.get("web-fault") is None for r in reps)
    assert all(not r.store.rejections for r in reps[1:])  # nobody else ever saw it


def test_an_expired_fault_stops_applying() -> None:
    from rumor.policy.evaluate import Evaluator

    s = PolicyStore(TrustSet.of([K1.public]))
    assert s.offer(NOW, fault_envelope(3600.0)).accepted
    assert Evaluator(s.documents()).fault("web") is not None
    assert s.next_expiry() == NOW - 10 + 3600.0
    assert s.expire(NOW + 3000) == []  # not yet
    assert Evaluator(s.documents()).fault("web") is not None
    gone = s.expire(NOW - 10 + 3600.0)
    assert [h.envelope.name for h in gone] == ["web-fault"]
    assert Evaluator(s.documents()).fault("web") is None
    assert s.counts["expired"] == 1
    # Offered again after its expiry (a peer's late copy): refused as expired.
    assert s.offer(NOW + 3600, fault_envelope(3600.0)).reason == "expired"
