"""Signed catalog sets (issue 27, finding 2): a member's catalog entry is its own signed
statement, stored and relayed verbatim; a key holder's forged records for a real member
are refused, so nothing serves them; agents of the previous build keep their plain view.

Written against the identity interface ``catalog.Identity`` with a fake that signs with
an HMAC per node (the real one is Ed25519, ``gossip/identity.py``)."""

from __future__ import annotations

import hashlib
import hmac

from dnslib import DNSRecord

from rumor.gossip.catalog import (
    MSG_RECORDS,
    MSG_SIGNED,
    SIGN_CONTEXT,
    SIGNED_CHANNEL,
    Catalog,
    Instance,
    decode_set,
    encode,
)
from rumor.gossip.config import LAN
from rumor.gossip.service_spec import parse_spec
from rumor.gossip.wire import UserMessage
from rumor.proxy.api.dns import DnsResponder

from ..fakenet import FakeNet

CFG = LAN.with_overrides(reconnect_interval=5.0, push_pull_interval=30.0)


class FakeIdentity:
    """``catalog.Identity``: every node's key is derived from its name; ``keys`` holds
    only the nodes whose key this side knows (a binding)."""

    def __init__(self, name: str, mode: str, secret: bytes | None = None) -> None:
        self.name = name
        self.mode = mode
        self.secret = secret if secret is not None else _key(name)
        self.seen_signed: set[str] = set()
        self.verified = 0

    def sign(self, context: bytes, data: bytes) -> bytes | None:
        if self.mode == "off":
            return None
        return hmac.new(self.secret, context + data, hashlib.sha256).digest()

    def verify(self, now: float, node: str, context: bytes, data: bytes, sig: bytes,
               source: str) -> bool:
        self.verified += 1
        ok = hmac.compare_digest(hmac.new(_key(node), context + data,
                                          hashlib.sha256).digest(), sig)
        if ok:
            self.seen_signed.add(node)
        return ok

    def accepts_unsigned(self, node: str) -> bool:
        return self.mode != "require" and node not in self.seen_signed


def _key(name: str) -> bytes:
    return hashlib.sha256(b"key of " + name.encode()).digest()


def _cluster(modes: list[str | None]) -> tuple[FakeNet, dict[str, Catalog]]:
    """One node per mode; None is an agent of the previous build (no identity, no
    signed channel)."""
    net = FakeNet(CFG)
    cats = {}
    for i, c in enumerate(net.cluster(len(modes))):
        mode = modes[i]
        ident = None if mode is None else FakeIdentity(c.name, mode)
        cat = Catalog(c, epoch=100 + i, now=net.now, identity=ident)
        c.register(cat)
        if mode is not None:
            c.register(cat.signed_channel())
        cats[c.name] = cat
    return net, cats


def _names(cat: Catalog, svc: str) -> list[str]:
    return [i.node for i in cat.instances(svc)]


def _spread(net: FakeNet, cats: dict[str, Catalog], svc: str, owners: list[str]) -> None:
    net.run_until(lambda: all(_names(c, svc) == owners for c in cats.values()), 10)


def test_a_members_entry_is_its_signed_set_kept_and_relayed_verbatim() -> None:
    net, cats = _cluster(["prefer"] * 4)
    owner = cats["n0"]
    owner.register_many(net.now, [parse_spec("name=web,port=80"),
                                  parse_spec("name=db,port=5432")])
    owner.deregister(net.now, "db")
    net.flush("n0")
    _spread(net, cats, "web", ["n0"])
    signed = owner._nodes["n0"].signed
    assert signed is not None
    node, epoch, version, records = decode_set(signed[0])
    assert (node, epoch, version) == ("n0", owner.epoch, owner.version)
    assert {(r.id, r.deleted) for r in records} == {("web", False), ("db", True)}
    net.run_until(lambda: all(c._nodes["n0"].signed == signed
                              for c in cats.values()), 10)
    # A late joiner gets the exact bytes in its join push-pull.
    late = net.add("late")
    late_cat = Catalog(late, epoch=1, now=net.now, identity=FakeIdentity("late", "require"))
    late.register(late_cat)
    late.register(late_cat.signed_channel())
    late.join(net.now, [net.nodes["n3"].addr])
    net.flush("late")
    net.run_until(lambda: _names(late_cat, "web") == ["n0"], 10)
    assert late_cat._nodes["n0"].signed == signed


def test_a_key_holders_forged_records_for_a_real_member_are_refused_and_never_served(
        ) -> None:
    """With the gossip key one can send anything a member can: plain records for n0 at
    an epoch a little ahead, or a set signed with another key. Neither is taken by an
    agent that saw n0 signed (prefer) or by any agent (require), so DNS never serves the
    forged address."""
    for mode in ("prefer", "require"):
        net, cats = _cluster([mode] * 3)
        owner = cats["n0"]
        owner.register(net.now, parse_spec("name=web,port=80"))
        net.flush("n0")
        _spread(net, cats, "web", ["n0"])
        n1 = cats["n1"]
        ahead = owner.epoch + 3_600 * 10**6  # an hour: well within MAX_EPOCH_AHEAD
        record = ["web", "web", "10.66.6.6", 6666, [], "", 1, 0, [], 1, False]
        n1.notify_message(net.now, encode([MSG_RECORDS, "n0", ahead, [record]]))
        body = encode(["n0", ahead, 10**6, [record]])
        assert decode_set(body)[0] == "n0"
        evil = hmac.new(b"another key", SIGN_CONTEXT + body, hashlib.sha256).digest()
        n1.core._deliver_user(net.now, _user(SIGNED_CHANNEL, encode([MSG_SIGNED, body, evil])))
        net.flush("n1")
        _wait(net, 3.0)
        for c in cats.values():
            (inst,) = c.instances("web")
            assert (inst.address, inst.port) == ("10.0.0.1", 80), mode
            answer = DnsResponder(_Dns(c)).answer(_query("web.service.rumor"))
            assert answer is not None
            assert [str(r.rdata) for r in DNSRecord.parse(answer).rr] == ["10.0.0.1"]
        assert n1.stats["records_unsigned_refused"] == 1
        assert n1.stats["sets_unverified"] == 1
        assert owner.stats["refutations"] == 0  # nothing reached it to outbid


def test_a_mixed_cluster_keeps_the_old_agents_plain_view_both_ways() -> None:
    """n0 and n1 of this build in "prefer" mode, n2 and n3 of the previous one: every
    service registered anywhere reaches everyone, and the old ones never see a signed
    message as anything but a channel they skip."""
    net, cats = _cluster(["prefer", "prefer", None, None])
    cats["n0"].register(net.now, parse_spec("name=new,port=80"))
    cats["n2"].register(net.now, parse_spec("name=old,port=81"))
    net.flush("n0")
    net.flush("n2")
    _spread(net, cats, "new", ["n0"])
    _spread(net, cats, "old", ["n2"])
    assert cats["n1"]._nodes["n0"].signed is not None
    assert cats["n1"]._nodes["n2"].signed is None  # plain: n2 has never signed
    assert all(c.stats["decode_errors"] == 0 for c in cats.values())
    assert net.nodes["n2"].stats["user_unknown_channel"] > 0  # skipped, not refused
    # A change of n0 reaches the old agents in plain form, relayed by n1 as well.
    cats["n0"].register(net.now, parse_spec("name=new2,port=82"))
    net.flush("n0")
    _spread(net, cats, "new2", ["n0"])


def test_require_mode_takes_only_signed_sets_and_sends_no_plain_state() -> None:
    net, cats = _cluster(["require"] * 3)
    cats["n0"].register(net.now, parse_spec("name=web,port=80"))
    net.flush("n0")
    _spread(net, cats, "web", ["n0"])
    assert cats["n1"].local_state(False) == b""
    assert cats["n1"].signed_state() != b""
    n2 = cats["n2"]
    n2.notify_message(net.now, encode([MSG_RECORDS, "n1", 200, [
        ["x", "x", "", 1, [], "", 1, 0, [], 1, False]]]))
    assert n2.instances("x") == [] and n2.stats["records_unsigned_refused"] == 1


def test_a_signed_set_past_the_caps_is_refused_whole_before_verifying() -> None:
    net, cats = _cluster(["prefer"] * 2)
    n1 = cats["n1"]
    records = [[f"s{i}", f"s{i}", "", 1, [], "", 1, 0, [], 1, False] for i in range(300)]
    body = encode(["n0", 200, 5, records])
    sig = FakeIdentity("n0", "prefer").sign(SIGN_CONTEXT, body)
    assert sig is not None
    ident = n1.identity
    assert isinstance(ident, FakeIdentity)
    n1.core._deliver_user(net.now, _user(SIGNED_CHANNEL, encode([MSG_SIGNED, body, sig])))
    assert n1.stats["records_over_node_cap"] == 300 and ident.verified == 0
    assert "n0" not in n1._nodes


def _wait(net: FakeNet, seconds: float) -> None:
    end = net.now + seconds
    net.run_until(lambda: net.now >= end, seconds + 1)


def _user(channel: str, payload: bytes) -> UserMessage:
    return UserMessage(channel, payload)


def _query(name: str) -> bytes:
    return bytes(DNSRecord.question(name, "A").pack())


class _Dns:
    """The DNS responder's view of a bare catalog."""

    def __init__(self, cat: Catalog) -> None:
        self.cat = cat

    def index(self) -> int:
        return self.cat.index

    def lookup(self, service: str, tag: str | None) -> list[Instance]:
        return self.cat.instances(service, tag=tag)

    def node_address(self, node: str) -> str | None:
        m = self.cat.core.members.get(node)
        return None if m is None else m.addr[0]


def test_with_the_real_identity_a_forged_epoch_for_a_member_is_refused() -> None:
    """The same forgery against cores running ``gossip/identity.py`` (Ed25519 node keys
    bound by credentials): the plain records an hour ahead are refused and DNS keeps
    serving the member's real address."""
    from .test_signed_state import signed_cluster

    for mode in ("prefer", "require"):
        net, cores = signed_cluster(3, mode)
        cats = {}
        for i, c in enumerate(cores):
            cat = Catalog(c, epoch=100 + i, now=net.now)
            c.register(cat)
            c.register(cat.signed_channel())
            cats[c.name] = cat
        assert cats["n1"].identity is cores[1].identity
        owner = cats["n0"]
        owner.register(net.now, parse_spec("name=web,port=80"))
        net.flush("n0")
        _spread(net, cats, "web", ["n0"])
        assert all(c._nodes["n0"].signed == owner._nodes["n0"].signed
                   for c in cats.values())
        n1 = cats["n1"]
        record = ["web", "web", "10.66.6.6", 6666, [], "", 1, 0, [], 1, False]
        n1.notify_message(net.now, encode([MSG_RECORDS, "n0", owner.epoch + 3_600 * 10**6,
                                           [record]]))
        answer = DnsResponder(_Dns(n1)).answer(_query("web.service.rumor"))
        assert answer is not None
        assert [str(r.rdata) for r in DNSRecord.parse(answer).rr] == ["10.0.0.1"], mode
        assert n1.stats["records_unsigned_refused"] == 1
