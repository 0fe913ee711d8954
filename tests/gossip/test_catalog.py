"""Sans-IO tests of the catalog delegate, the check state machine, service specs and the
DNS responder (virtual clock, FakeNet; hypothesis for every parser of untrusted input)."""

from __future__ import annotations

import contextlib
import math
import struct

import pytest
from dnslib import EDNS0, QTYPE, RCODE, DNSRecord
from hypothesis import given, settings
from hypothesis import strategies as st

from rumor.gossip.catalog import (
    MSG_RECORDS,
    Catalog,
    CatalogDecodeError,
    Instance,
    decode,
    encode,
)
from rumor.gossip.checks import CRITICAL, PASSING, WARNING, CheckSpec, CheckState
from rumor.gossip.config import LAN
from rumor.gossip.service_spec import (
    SpecError,
    parse_duration,
    parse_spec,
    registration_from_mapping,
    registrations_from_toml,
)
from rumor.proxy.api.dns import DnsResponder

from ..fakenet import FakeNet

CFG = LAN.with_overrides(reconnect_interval=5.0, push_pull_interval=30.0)


def _cluster(n: int) -> tuple[FakeNet, dict[str, Catalog]]:
    net = FakeNet(CFG)
    cores = net.cluster(n)
    cats = {}
    for i, c in enumerate(cores):
        cat = Catalog(c, epoch=100 + i, now=net.now)
        c.register(cat)
        cats[c.name] = cat
    return net, cats


def _names(cat: Catalog, svc: str, **kw: object) -> list[str]:
    return [i.node for i in cat.instances(svc, **kw)]  # type: ignore[arg-type]


# ---- catalog replication ------------------------------------------------------------------


def test_registration_replicates_and_deregistration_removes() -> None:
    net, cats = _cluster(4)
    cats["n1"].register(net.now, parse_spec("name=web,port=8080,version=v2,tags=blue|canary"))
    net.flush("n1")
    net.run_until(lambda: all(_names(c, "web") == ["n1"] for c in cats.values()), 5)
    inst = cats["n3"].instances("web")[0]
    assert (inst.address, inst.port, inst.tags, inst.version) == (
        "10.0.0.2", 8080, ("blue", "canary"), "v2")
    assert _names(cats["n3"], "web", tag="canary") == ["n1"]
    assert _names(cats["n3"], "web", tag="green") == []
    assert _names(cats["n3"], "web", version="v1") == []
    cats["n1"].deregister(net.now, "web")
    net.flush("n1")
    net.run_until(lambda: all(not c.instances("web") for c in cats.values()), 5)


def test_fifty_services_go_by_stream_and_push_pull_brings_them_to_a_joiner() -> None:
    net, cats = _cluster(3)
    regs = [parse_spec(f"name=svc{i:02d},port={9000 + i},version=v{i % 3},"
                       f"tags=tag-a-{i}|tag-b-{i}|zone-eu-west-1") for i in range(50)]
    cats["n0"].register_many(net.now, regs)
    assert len(cats["n0"].local_state(False)) > 1400  # bigger than any datagram
    net.flush("n0")
    net.run_until(lambda: all(len(c.services()) == 50 for c in cats.values()), 5)
    # A member joining later gets everything from its join push-pull.
    late = net.add("late")
    late_cat = Catalog(late, epoch=1, now=net.now)
    late.register(late_cat)
    late.join(net.now, [net.nodes["n2"].addr])
    net.flush("late")
    net.run_until(lambda: len(late_cat.services()) == 50, 5)


def test_failed_member_services_disappear_and_come_back_when_it_refutes() -> None:
    net, cats = _cluster(4)
    cats["n2"].register(net.now, parse_spec("name=db,port=5432"))
    net.flush("n2")
    net.run_until(lambda: _names(cats["n0"], "db") == ["n2"], 5)
    idx = cats["n0"].service_index("db")
    net.crash("n2")
    net.run_until(lambda: net.status("n0", "n2") == "failed", 60)
    assert cats["n0"].instances("db") == []
    assert cats["n0"].service_index("db") > idx
    net.crashed.discard("n2")  # it was only unreachable: it refutes and is back
    net.run_until(lambda: net.status("n0", "n2") == "alive", 60)
    assert _names(cats["n0"], "db") == ["n2"]


def test_critical_instances_are_hidden_unless_asked_for_and_status_is_gossiped() -> None:
    net, cats = _cluster(3)
    reg = parse_spec("name=api,port=80,check=http://127.0.0.1:80/h,interval=1s,rise=2,fall=2")
    (cid,) = cats["n0"].register(net.now, reg)
    net.flush("n0")
    net.run_until(lambda: _names(cats["n2"], "api", include_critical=True) == ["n0"], 5)
    assert cats["n2"].instances("api") == []  # starts critical until it passed `rise` times
    assert not cats["n0"].check_result(net.now, cid, PASSING)
    assert cats["n0"].check_result(net.now, cid, PASSING)
    net.flush("n0")
    net.run_until(lambda: _names(cats["n2"], "api") == ["n0"], 5)
    cats["n0"].check_result(net.now, cid, WARNING, "429")
    net.flush("n0")
    net.run_until(lambda: cats["n2"].instances("api", passing=True) == [], 5)
    assert _names(cats["n2"], "api") == ["n0"]  # warning: still served by default
    cats["n0"].check_result(net.now, cid, CRITICAL)
    cats["n0"].check_result(net.now, cid, CRITICAL)
    net.flush("n0")
    net.run_until(lambda: cats["n2"].instances("api") == [], 5)
    assert cats["n2"].instances("api", include_critical=True)[0].status == CRITICAL


def test_restarted_node_replaces_its_previous_life_and_stale_records_lose() -> None:
    net, cats = _cluster(2)
    r1 = cats["n0"]
    r1.register(net.now, parse_spec("name=old,port=1"))
    net.flush("n0")
    net.run_until(lambda: bool(cats["n1"].instances("old")), 5)
    # Records of a newer epoch of n0 (its next life) replace all older ones.
    newer = encode([MSG_RECORDS, "n0", r1.epoch + 1, [
        ["new", "new", "", 2, [], "", 1, 0, [], 1, False]]])
    cats["n1"].notify_message(net.now, newer)
    assert cats["n1"].instances("old") == [] and _names(cats["n1"], "new") == ["n0"]
    # An older epoch is ignored; so is a lower revision; so is anything about ourselves.
    cats["n1"].notify_message(net.now, encode([MSG_RECORDS, "n0", r1.epoch, [
        ["old", "old", "", 1, [], "", 1, 0, [], 99, False]]]))
    assert cats["n1"].instances("old") == []
    cats["n1"].notify_message(net.now, encode([MSG_RECORDS, "n1", 10**12, [
        ["x", "x", "", 1, [], "", 1, 0, [], 1, False]]]))
    assert cats["n1"].instances("x") == []


def test_the_owner_outbids_forged_records_about_itself_on_every_agent() -> None:
    """Forged records for n0 (a newer epoch with services it does not run, or its own
    epoch with a revision it never reached) spread to its peers, reach n0, and n0
    outbids them with a newer epoch: everyone ends with what n0 really runs."""
    net, cats = _cluster(3)
    owner = cats["n0"]
    owner.register(net.now, parse_spec("name=web,port=80"))
    net.flush("n0")
    net.run_until(lambda: all(_names(c, "web") == ["n0"] for c in cats.values()), 5)
    for ahead, rev in ((10**9, 1), (0, 10**6)):
        epoch_before = owner.epoch
        forged_epoch = owner.epoch + ahead
        forged = encode([MSG_RECORDS, "n0", forged_epoch, [
            ["evil", "evil", "", 6666, [], "", 1, 0, [], rev, False]]])
        cats["n1"].notify_message(net.now, forged)
        net.flush("n1")
        assert _names(cats["n1"], "evil") == ["n0"]  # n1 cannot tell it is forged...
        net.run_until(lambda: all(c.instances("evil") == [] for c in cats.values())
                      and all(_names(c, "web") == ["n0"] for c in cats.values()), 10)
        assert owner.epoch > max(epoch_before, forged_epoch)  # ...but n0 can, and wins
    assert owner.stats["refutations"] == 2
    # Echoes of n0's own records, and old ones, are not forgeries.
    for peer in ("n1", "n2"):
        owner.merge_remote_state(net.now, cats[peer].local_state(False), False, peer)
    assert owner.stats["refutations"] == 2


def test_an_epoch_far_in_the_future_is_refused_by_everyone() -> None:
    net, cats = _cluster(2)
    cats["n0"].register(net.now, parse_spec("name=web,port=80"))
    net.flush("n0")
    net.run_until(lambda: _names(cats["n1"], "web") == ["n0"], 5)
    day_and_more = int((net.now + 2 * 86_400) * 1e6)
    forged = encode([MSG_RECORDS, "n0", day_and_more, [
        ["evil", "evil", "", 6666, [], "", 1, 0, [], 1, False]]])
    for cat in cats.values():
        cat.notify_message(net.now, forged)
    assert all(c.instances("evil") == [] for c in cats.values())
    assert _names(cats["n1"], "web") == ["n0"]
    assert cats["n0"].stats["refutations"] == 0
    assert all(c.stats["records_absurd"] == 1 for c in cats.values())


def test_instances_sort_by_rtt_with_near() -> None:
    net, cats = _cluster(3)
    for n in ("n1", "n2"):
        cats[n].register(net.now, parse_spec("name=web,port=80"))
        net.flush(n)
    net.run_until(lambda: len(cats["n0"].instances("web")) == 2, 5)
    core = cats["n0"].core
    core.members["n1"].rtt, core.members["n2"].rtt = 0.020, 0.002
    assert _names(cats["n0"], "web") == ["n1", "n2"]
    assert _names(cats["n0"], "web", near=True) == ["n2", "n1"]
    assert cats["n0"].instances("web", near=True)[0].to_json()["rtt_ms"] == 2.0


def test_ttl_check_expires_and_heartbeats_revive_it() -> None:
    net, cats = _cluster(2)
    cat = cats["n0"]
    (cid,) = cat.register(net.now, parse_spec("name=job,port=1,check=ttl,ttl=10s"))
    assert cat.instances("job") == []
    cat.heartbeat(net.now, cid)
    assert _names(cat, "job") == ["n0"]
    assert cat.next_deadline() == pytest.approx(net.now + 10)
    cat.tick(net.now + 10.5)
    assert cat.instances("job") == []
    with pytest.raises(KeyError):
        cat.heartbeat(net.now, "nope")


def test_decode_rejects_garbage_with_one_error_type() -> None:
    for bad in [b"", b"\x02", b"\x01\xc1", b"\x01\x90", encode([9]), encode([1, "n", 1]),
                encode([1, "n", -1, []]), encode([1, "n", 1, [[1] * 11]]),
                encode([1, "n", 1, [["a", "b", "", 70000, [], "", 1, 0, [], 1, False]]]),
                encode([2, [["n", 1, [["a", "", "", 1, [], "", 1, 0, [], 1, False]]]]])]:
        with pytest.raises(CatalogDecodeError):
            decode(bad)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_decode_of_random_bytes_raises_only_its_error(data: bytes) -> None:
    for payload in (data, b"\x01" + data):
        with contextlib.suppress(CatalogDecodeError):
            decode(payload)


_json = st.recursive(st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1)
                     | st.text(max_size=8)
                     | st.binary(max_size=8),
                     lambda c: st.lists(c, max_size=12) | st.dictionaries(st.text(max_size=4),
                                                                           c, max_size=4),
                     max_leaves=40)


@settings(max_examples=300, deadline=None)
@given(_json)
def test_decode_of_random_msgpack_raises_only_its_error(obj: object) -> None:
    with contextlib.suppress(CatalogDecodeError):
        decode(encode(obj))  # type: ignore[arg-type]


def test_malformed_broadcasts_and_state_are_counted_not_raised() -> None:
    net, cats = _cluster(2)
    cats["n0"].notify_message(net.now, b"\x01garbage")
    cats["n0"].merge_remote_state(net.now, b"\x07", False, "n1")
    assert cats["n0"].stats["decode_errors"] == 2


# ---- checks -----------------------------------------------------------------------------------


def test_check_thresholds_rise_fall_and_warn() -> None:
    s = CheckState("c", CheckSpec("http", "http://x/", interval=1, timeout=1, rise=2, fall=3,
                                  warn=1), 0.0)
    assert s.status == CRITICAL
    assert not s.record(1, PASSING) and s.record(2, PASSING) and s.status == PASSING
    assert s.record(3, CRITICAL) and s.status == WARNING  # warn after 1 failure
    assert not s.record(4, CRITICAL)
    assert s.record(5, CRITICAL) and s.status == CRITICAL  # critical after 3
    assert not s.record(6, PASSING) and s.record(7, PASSING)
    assert s.record(8, WARNING) and s.status == WARNING  # a 429 warns at once
    with pytest.raises(ValueError):
        s.record(9, "bogus")
    with pytest.raises(ValueError):
        s.heartbeat(9)
    assert CheckSpec("tcp", "h:1", interval=2, timeout=1, fall=3).detection_time() == 7


def test_ttl_state_machine() -> None:
    s = CheckState("t", CheckSpec("ttl", ttl=5, initial=PASSING), 0.0)
    assert s.next_deadline() == 5
    assert not s.tick(4.9) and s.tick(5.0) and s.status == CRITICAL
    assert s.next_deadline() == math.inf
    assert s.heartbeat(6, PASSING) and s.next_deadline() == 11


# ---- service specs -----------------------------------------------------------------------------


def test_spec_parses_every_field() -> None:
    r = parse_spec("name=web,port=8080,version=v2,tags=blue|canary,id=web-1,weight=5,"
                   "address=10.1.2.3,check=http://127.0.0.1:8080/healthz,interval=500ms,"
                   "timeout=200ms,rise=2,fall=3,warn=1,initial=passing")
    s, (c,) = r.service, r.checks
    assert (s.id, s.name, s.port, s.tags, s.version, s.weight, s.address) == (
        "web-1", "web", 8080, ("blue", "canary"), "v2", 5, "10.1.2.3")
    assert (c.kind, c.interval, c.timeout, c.rise, c.fall, c.warn, c.initial) == (
        "http", 0.5, 0.2, 2, 3, 1, PASSING)
    assert parse_spec("name=db,port=1,check=tcp://127.0.0.1:5432").checks[0].target == \
        "127.0.0.1:5432"
    assert parse_spec("name=j,port=1,check=ttl,ttl=1m").checks[0].ttl == 60
    assert parse_duration("1.5s") == 1.5 and parse_duration(3) == 3.0


@pytest.mark.parametrize(("spec", "needle"), [
    ("port=80", "'name' is required"),
    ("name=web", "'port' is required"),
    ("name=web,port=0", "port 0: expected an integer from 1 to 65535"),
    ("name=web,port=http", "port 'http'"),
    ("name=we b,port=1", "expected a DNS label"),
    ("name=web,port=1,colour=red", "unknown field 'colour'"),
    ("name=web,port=1,check=ftp://x", "expected http://"),
    ("name=web,port=1,check=tcp://host", "expected tcp://HOST:PORT"),
    ("name=web,port=1,check=ttl", "needs ttl="),
    ("name=web,port=1,interval=5s", "'interval' given without check="),
    ("name=web,port=1,check=http://h/,interval=soon", "interval 'soon'"),
    ("name=web,port=1,check=http://h/,interval=1s,timeout=5s", "timeout 5.0"),
    ("name=web,port=1,tags=a b", "tag 'a b'"),
    ("name=web,port=1,name=x", "given twice"),
    ("name=web,port", "expected key=value"),
])
def test_bad_specs_name_the_field(spec: str, needle: str) -> None:
    with pytest.raises(SpecError) as e:
        parse_spec(spec)
    assert needle in str(e.value) and "\n" not in str(e.value)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=120))
def test_spec_parser_raises_only_spec_errors(text: str) -> None:
    with contextlib.suppress(SpecError):
        parse_spec(text)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(["name", "port", "tags", "check", "interval", "ttl",
                                         "weight", "checks", "rise", "x"]), _json, max_size=6))
def test_mapping_parser_raises_only_spec_errors(doc: dict[str, object]) -> None:
    with contextlib.suppress(SpecError):
        registration_from_mapping(doc)


def test_toml_config() -> None:
    import tomllib
    doc = tomllib.loads("""
[[service]]
name = "web"
port = 8080
tags = ["blue"]
checks = [{check = "http://127.0.0.1:8080/", interval = "2s"}, {check = "ttl", ttl = 30}]
""")
    (r,) = registrations_from_toml(doc, "f.toml")
    assert [c.kind for c in r.checks] == ["http", "ttl"]
    with pytest.raises(SpecError, match="unknown top-level key 'servce'"):
        registrations_from_toml({"servce": []}, "f.toml")


# ---- DNS responder ---------------------------------------------------------------------------


class _Source:
    def __init__(self) -> None:
        self.idx = 1
        self.data = {"web": [
            Instance("web-1", "web", "node-b", "10.0.0.2", 8080, ("canary",), "v2", 3,
                     PASSING, (), 0.001),
            Instance("web-2", "web", "node-c", "10.0.0.3", 8081, (), "v1", 1, PASSING, (),
                     0.002)]}

    def index(self) -> int:
        return self.idx

    def lookup(self, service: str, tag: str | None) -> list[Instance]:
        return [i for i in self.data.get(service, []) if tag is None or tag in i.tags]

    def node_address(self, node: str) -> str | None:
        return {"node-b": "10.0.0.2", "node-c": "10.0.0.3"}.get(node)


def _ask(r: DnsResponder, name: str, qtype: str = "A") -> DNSRecord:
    out = r.answer(DNSRecord.question(name, qtype).pack())
    assert out is not None
    return DNSRecord.parse(out)


def test_dns_answers_a_srv_tag_and_nxdomain() -> None:
    r = DnsResponder(_Source())
    a = _ask(r, "web.service.rumor")
    assert [str(x.rdata) for x in a.rr] == ["10.0.0.2", "10.0.0.3"]
    srv = _ask(r, "WEB.service.rumor.", "SRV")
    assert [(x.rdata.port, x.rdata.weight, str(x.rdata.target)) for x in srv.rr] == [
        (8080, 3, "node-b.node.rumor."), (8081, 1, "node-c.node.rumor.")]
    assert {str(x.rdata) for x in srv.ar} == {"10.0.0.2", "10.0.0.3"}
    assert [str(x.rdata) for x in _ask(r, "canary.web.service.rumor").rr] == ["10.0.0.2"]
    assert _ask(r, "_web._canary.service.rumor", "SRV").rr[0].rdata.port == 8080
    assert _ask(r, "_web._tcp.service.rumor", "SRV").header.rcode == RCODE.NOERROR
    assert _ask(r, "nope.service.rumor").header.rcode == RCODE.NXDOMAIN
    assert _ask(r, "blue.web.service.rumor").header.rcode == RCODE.NXDOMAIN
    assert _ask(r, "x.y.z.service.rumor").header.rcode == RCODE.NXDOMAIN
    assert _ask(r, "example.com").header.rcode == RCODE.REFUSED
    assert str(_ask(r, "node-b.node.rumor").rr[0].rdata) == "10.0.0.2"
    assert _ask(r, "web.service.rumor", "TXT").rr == []


def test_dns_cache_follows_the_index_and_keeps_query_ids() -> None:
    src = _Source()
    r = DnsResponder(src)
    q = DNSRecord.question("web.service.rumor", "A")
    q.header.id = 4242
    first = DNSRecord.parse(r.answer(q.pack()) or b"")
    q.header.id = 7
    second = DNSRecord.parse(r.answer(q.pack()) or b"")
    assert (first.header.id, second.header.id) == (4242, 7) and r.stats["cache_hits"] == 1
    src.data["web"] = src.data["web"][:1]
    src.idx += 1
    assert len(DNSRecord.parse(r.answer(q.pack()) or b"").rr) == 1


def test_dns_malformed_gets_formerr_and_responses_are_ignored() -> None:
    r = DnsResponder(_Source())
    bad = struct.pack(">HHHHHH", 99, 0x0100, 1, 0, 0, 0) + b"\x05web"  # truncated question
    out = r.answer(bad)
    assert out is not None and out[:2] == bad[:2] and out[3] & 0x0F == RCODE.FORMERR
    two = DNSRecord.question("web.service.rumor")
    two.add_question(DNSRecord.question("x.service.rumor").q)
    assert DNSRecord.parse(r.answer(two.pack()) or b"").header.rcode == RCODE.FORMERR
    resp = DNSRecord.question("web.service.rumor").reply()
    assert r.answer(resp.pack()) is None
    assert r.answer(b"\x00") is None


def test_dns_truncates_to_the_udp_size() -> None:
    src = _Source()
    src.data["big"] = [Instance(f"i{i}", "big", f"node-{i:03d}", f"10.0.{i // 250}.{i % 250}",
                                1000 + i, (), "", 1, PASSING, (), None) for i in range(100)]
    out = DnsResponder(src).answer(DNSRecord.question("big.service.rumor", "SRV").pack())
    assert out is not None and len(out) <= 512
    rec = DNSRecord.parse(out)
    assert rec.header.tc == 1 and 0 < len(rec.rr) < 100
    assert QTYPE.get(rec.rr[0].rtype) == "SRV"


def _big(n: int) -> _Source:
    src = _Source()
    src.data["big"] = [Instance(f"i{i}", "big", f"node-{i:04d}",
                                f"10.0.{i // 250}.{i % 250}", 1000 + i, (), "", 1, PASSING,
                                (), None) for i in range(n)]
    return src


def test_dns_size_limit_follows_the_transport() -> None:
    r = DnsResponder(_big(100))
    q = DNSRecord.question("big.service.rumor", "SRV")
    udp = DNSRecord.parse(r.answer(q.pack()) or b"")
    assert udp.header.tc == 1 and 0 < len(udp.rr) < 100 and udp.ar == []
    # The same question bytes over TCP: not the cut answer cached for UDP, all of it,
    # each target's A record in the additional section.
    tcp_out = r.answer(q.pack(), tcp=True)
    assert tcp_out is not None and 4096 < len(tcp_out) <= 65535
    tcp = DNSRecord.parse(tcp_out)
    assert tcp.header.tc == 0 and len(tcp.rr) == 100
    assert {str(x.rname) for x in tcp.ar} == {str(x.rdata.target) for x in tcp.rr}
    assert DNSRecord.parse(r.answer(q.pack(), tcp=True) or b"").header.tc == 0
    assert r.stats["cache_hits"] == 1
    # EDNS0 raises the UDP limit to the client's size, at most 4096.
    q.add_ar(EDNS0(udp_len=65000))
    edns_out = r.answer(q.pack())
    assert edns_out is not None and 512 < len(edns_out) <= 4096
    edns = DNSRecord.parse(edns_out)
    # Every answer fits, not every additional record: those that fit, and no TC (the
    # client has all it asked for).
    assert edns.header.tc == 0 and len(edns.rr) == 100
    assert 0 < len([x for x in edns.ar if QTYPE.get(x.rtype) == "A"]) < 100


def test_dns_over_tcp_cuts_only_past_a_dns_messages_size() -> None:
    out = DnsResponder(_big(5000)).answer(
        DNSRecord.question("big.service.rumor", "A").pack(), tcp=True)
    assert out is not None and 60000 < len(out) <= 65535
    rec = DNSRecord.parse(out)
    assert rec.header.tc == 1 and 3000 < len(rec.rr) < 5000


def test_dns_ttls_come_from_configuration() -> None:
    src = _Source()
    src.data["web"].append(Instance("web-3", "web", "node-b", "10.0.0.7", 9000, (), "", 1,
                                    PASSING, (), None))
    r = DnsResponder(src, service_ttl=30, node_ttl=300)
    srv = _ask(r, "web.service.rumor", "SRV")
    assert {x.ttl for x in srv.rr} == {30} and {x.ttl for x in srv.ar} == {30}
    assert {x.ttl for x in _ask(r, "web.service.rumor").rr} == {30}
    assert [x.ttl for x in _ask(r, "node-b.node.rumor").rr] == [300]
    assert [x.ttl for x in _ask(r, "0a000007.addr.rumor").rr] == [300]
    assert {x.ttl for x in _ask(DnsResponder(src), "web.service.rumor", "SRV").rr} == {0}
    for bad in ({"service_ttl": -1}, {"node_ttl": 86401}):
        with pytest.raises(ValueError, match="TTL must be 0 to 86400 seconds"):
            DnsResponder(src, **bad)  # type: ignore[arg-type]


def test_dns_srv_targets_resolve_to_where_each_instance_listens() -> None:
    src = _Source()
    src.data["api"] = [
        Instance("a1", "api", "node-b", "10.0.0.2", 80, (), "", 1, PASSING, (), None),
        # Same agent, its own addresses: its own targets, never node-b's address.
        Instance("a2", "api", "node-b", "10.0.0.8", 81, (), "", 1, PASSING, (), None),
        Instance("a3", "api", "node-b", "fd00::5", 82, (), "", 1, PASSING, (), None),
        Instance("a4", "api", "node-b", "db.example", 83, (), "", 1, PASSING, (), None)]
    r = DnsResponder(src)
    srv = _ask(r, "api.service.rumor", "SRV")
    targets = [(x.rdata.port, str(x.rdata.target)) for x in srv.rr]
    assert targets == [(80, "node-b.node.rumor."), (81, "0a000008.addr.rumor."),
                       (82, "fd000000000000000000000000000005.addr.rumor."),
                       (83, "db.example.")]
    assert [(str(x.rname), QTYPE.get(x.rtype), str(x.rdata)) for x in srv.ar] == [
        ("node-b.node.rumor.", "A", "10.0.0.2"), ("0a000008.addr.rumor.", "A", "10.0.0.8"),
        ("fd000000000000000000000000000005.addr.rumor.", "AAAA", "fd00::5")]
    # Every target in the rumor domain resolves on its own to the same address.
    for rr in srv.ar:
        qtype = QTYPE.get(rr.rtype)
        assert [str(x.rdata) for x in _ask(r, str(rr.rname), qtype).rr] == [str(rr.rdata)]
    assert _ask(r, "0a00000.addr.rumor").header.rcode == RCODE.NXDOMAIN
    assert _ask(r, "zz000008.addr.rumor").header.rcode == RCODE.NXDOMAIN


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=200))
def test_dns_never_raises_on_random_bytes(data: bytes) -> None:
    out = DnsResponder(_Source()).answer(data)
    if out is not None:
        assert len(out) >= 12 and out[:2] == data[:2] and out[2] & 0x80


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_.", min_size=1,
                        max_size=20), min_size=1, max_size=5),
       st.sampled_from(["A", "AAAA", "SRV", "ANY", "TXT", "MX"]),
       st.integers(0, 0xFFFF))
def test_dns_handles_any_well_formed_question(labels: list[str], qtype: str, qid: int) -> None:
    name = ".".join(x.strip(".") or "x" for x in labels) + ".service.rumor"
    try:
        q = DNSRecord.question(name, qtype)
    except Exception:
        return  # dnslib refuses to build it (label too long): not our parser's business
    q.header.id = qid
    out = DnsResponder(_Source()).answer(q.pack())
    assert out is not None and DNSRecord.parse(out).header.id == qid


def test_a_packet_never_carries_the_same_application_message_twice() -> None:
    """Core regression found by the catalog: the 'fill the rest' pass re-took a message
    from the first pass, burning two of its transmits on one packet."""
    import random

    from rumor.gossip.membership import Membership
    from rumor.gossip.wire import decode_packet
    c = Membership("me", ("10.0.0.1", 1), CFG, random.Random(1))
    cat = Catalog(c, epoch=1)
    c.register(cat)
    cat.register(0.0, parse_spec("name=web,port=80"))
    c.take_effects()
    c._send(0.0, ("10.0.0.2", 1), "peer", [])
    (pkt,) = [e for e in c.take_effects() if hasattr(e, "data")]
    msgs = decode_packet(pkt.data)  # type: ignore[union-attr]
    assert sum(1 for m in msgs if getattr(m, "channel", None) == "catalog") == 1


def _raw_query(labels: list[bytes], qtype: int = 1) -> bytes:
    """A query written byte by byte: names dnslib's own encoder would refuse to build."""
    out = struct.pack(">HHHHHH", 7, 0x0100, 1, 0, 0, 0)
    for label in labels:
        out += bytes([len(label)]) + label
    return out + b"\x00" + struct.pack(">HH", qtype, 1)


def test_dns_over_long_names_get_formerr_and_odd_node_names_an_address_target() -> None:
    r = DnsResponder(_Source())
    for labels in ([b"a" * 63] * 5 + [b"service", b"rumor"],  # 330 bytes: over DNS's 255
                   [b"b" * 63] * 4 + [b"rumor"]):
        out = r.answer(_raw_query(labels))
        assert out is not None and out[3] & 0x0F == RCODE.FORMERR
    for labels in ([b"x\x00y", b"service", b"rumor"], [b"\xff\xfe", b"service", b"rumor"]):
        out = r.answer(_raw_query(labels, 33))
        assert out is not None and out[3] & 0x0F in (RCODE.NXDOMAIN, RCODE.FORMERR)
    src = _Source()  # a member name DNS cannot spell: its address names the SRV target
    src.data["odd"] = [Instance("o1", "odd", "n" * 100, "10.0.0.9", 80, (), "", 1, PASSING,
                                (), None),
                       Instance("o2", "odd", "m" * 100, "h" * 70 + ".example", 80, (), "",
                                1, PASSING, (), None)]
    odd = DnsResponder(src)  # ... and a host name DNS cannot spell gets no SRV, no error
    rec = _ask(odd, "odd.service.rumor", "ANY")
    assert rec.header.rcode == 0 and [QTYPE.get(x.rtype) for x in rec.rr] == ["A", "SRV"]
    assert str(rec.rr[1].rdata.target) == "0a000009.addr.rumor."
    assert odd.stats["srv_unnamed"] == 1 and [str(x.rdata) for x in rec.ar] == ["10.0.0.9"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(min_size=1, max_size=63), min_size=0, max_size=8),
       st.sampled_from([1, 28, 33, 255, 16]), st.booleans())
def test_dns_any_wire_legal_query_gets_an_answer_not_an_error(
        labels: list[bytes], qtype: int, in_domain: bool) -> None:
    names = labels + ([b"service", b"rumor"] if in_domain else [])
    out = DnsResponder(_Source()).answer(_raw_query(names, qtype))
    assert out is not None and out[2] & 0x80
    assert out[3] & 0x0F != RCODE.SERVFAIL


# ---- the state digest (anti-entropy on demand) -------------------------------------------


def test_catalogs_holding_the_same_records_have_the_same_digest() -> None:
    net, cats = _cluster(3)
    digests = {c.state_digest() for c in cats.values()}
    cats["n1"].register(net.now, parse_spec("name=web,port=8080"))
    changed = cats["n1"].state_digest()
    assert changed not in digests
    net.flush("n1")
    net.run(3)
    assert {c.state_digest() for c in cats.values()} == {changed}
    cats["n1"].deregister(net.now, "web")
    net.flush("n1")
    net.run(3)
    tomb = {c.state_digest() for c in cats.values()}
    assert len(tomb) == 1 and changed not in tomb
    # Tombstones are collected at different times on different agents; once all
    # are, the digests agree again.
    for c in cats.values():
        c.tombstone_ttl = 0.0
        c._collect_tombstones(net.now)
    assert len({c.state_digest() for c in cats.values()}) == 1


def test_a_catalog_that_missed_a_record_is_repaired_by_digest_not_push_pull_period() -> None:
    net, cats = _cluster(4)
    net.run(3)
    # n3 hears no datagram for two seconds: every copy of the registration is lost.
    net.drop_udp = lambda s, d: d == "n3"
    cats["n1"].register(net.now, parse_spec("name=web,port=8080"))
    net.flush("n1")
    net.run(2.0)
    assert not cats["n3"].instances("web")
    net.drop_udp = lambda s, d: False
    took = net.run_until(lambda: bool(cats["n3"].instances("web")), limit=10)
    assert took < 3.0, took  # the periodic push-pull is 30 s away
    assert sum(n.stats["state_repairs"] for n in net.nodes.values()) >= 1


def test_weight_zero_drains_and_is_accepted_everywhere_a_registration_is() -> None:
    # The spec string, TOML and the API's JSON all go through registration_from_mapping.
    assert parse_spec("name=web,port=8080,weight=0").service.weight == 0
    assert registration_from_mapping({"name": "web", "port": 8080, "weight": 0},
                                     "api").service.weight == 0
    assert parse_spec("name=web,port=8080").service.weight == 1
    for bad in ("-1", "65536"):
        with pytest.raises(SpecError, match="from 0 to 65535"):
            parse_spec(f"name=web,port=8080,weight={bad}")
    # A draining instance replicates with its weight (the wire takes 0 to 65535).
    net, cats = _cluster(3)
    cats["n1"].register(net.now, parse_spec("name=web,port=8080,weight=0"))
    net.flush("n1")
    net.run_until(lambda: all(_names(c, "web") == ["n1"] for c in cats.values()), 5)
    assert cats["n2"].instances("web")[0].weight == 0
