# layer: shell — answers DNS with wall-clock TTLs (time)
"""DNS interface to the catalog: A and SRV records for ``NAME.service.rumor.``.

Applications that cannot call the API resolve services the way they resolve anything
else. The agent answers from its own replicated catalog, like Consul's DNS interface:

- ``NAME.service.rumor.`` and ``TAG.NAME.service.rumor.`` (also the RFC 2782 forms
  ``_NAME._tcp.service.rumor.`` and ``_NAME._TAG.service.rumor.``): A (or AAAA)
  records with the instances' addresses, SRV records with their ports, weights and a
  target ``NODE.node.rumor.`` whose address goes in the additional section;
- ``NODE.node.rumor.``: the agent's address; ``HEX.addr.rumor.``: the address spelled
  in hex (8 digits for IPv4, 32 for IPv6), the SRV target of an instance announced
  at an address other than its agent's (Consul's form), so every SRV target resolves
  to the address the instance listens on; an instance announced at a host name gets
  that name as its target;
- critical instances are never returned; nearest first (the probe RTT this agent
  measured); TTLs come from configuration (``--dns-service-ttl`` for the records of a
  service answer, ``--dns-node-ttl`` for node and address answers), 0 by default so
  clients come back for fresh answers;
- NXDOMAIN for names under ``rumor.`` that match nothing, REFUSED for names outside
  (we are not a recursive resolver), FORMERR for packets that do not parse or do not
  carry exactly one question, NOTIMP for opcodes other than QUERY; responses are
  never answered (no reflection loops). The caller names the transport: over UDP an
  answer that does not fit (512 bytes, or the client's EDNS0 size up to 4096) is cut
  with the TC bit set, so the client asks again over TCP, where it gets the whole
  answer (up to a DNS message's 65535 bytes).

Wire format is dnslib's (a well-kept, pure-Python codec). ``DnsResponder.answer`` is
sans-IO (bytes in, bytes out); ``dns_server.serve_dns`` is the trio shell (UDP and TCP
on one port). Answers are cached per transport and question bytes for up to a second
and only while the catalog index is unchanged, so a busy resolver costs one dictionary
lookup per query.
"""

from __future__ import annotations

import ipaddress
import time
from collections import Counter
from collections.abc import Callable
from typing import Protocol

from dnslib import AAAA, EDNS0, QTYPE, RCODE, RR, SRV, A, DNSHeader, DNSLabel, DNSRecord
from dnslib.label import DNSLabelError

from ...gossip.catalog import Instance

DOMAIN = "rumor"
UDP_LIMIT = 512
EDNS_LIMIT = 4096
#: A DNS message over TCP carries a 16-bit length: nothing bigger can be sent.
TCP_LIMIT = 65535
#: The longest TTL the options accept (a day): a catalog answer cached longer than
#: that outlives any deploy, so a larger value is a typo, not a choice.
MAX_TTL = 86400
CACHE_SECONDS = 1.0
CACHE_ENTRIES = 4096


class DnsSource(Protocol):
    """What the responder needs from the catalog (``proxy.api.dns.CatalogSource``)."""

    def index(self) -> int: ...

    def lookup(self, service: str, tag: str | None) -> list[Instance]: ...

    def node_address(self, node: str) -> str | None: ...


class CatalogSource:
    """A ``DnsSource`` over a ``Discovery`` (of ``node.parts.catalog``) and the members list."""

    def __init__(self, discovery: _Discovery, member_address: Callable[[str], str | None]):
        self._d = discovery
        self._member_address = member_address
        self._names: dict[str, str] = {}
        self._names_index = -1

    def index(self) -> int:
        return self._d.index()

    def lookup(self, service: str, tag: str | None) -> list[Instance]:
        # DNS is case-insensitive; service names are not, so map the lower-case form.
        if self._names_index != self._d.index():
            self._names = {n.lower(): n for n in self._d.services()}
            self._names_index = self._d.index()
        name = self._names.get(service)
        if name is None:
            return []
        return [i for i in self._d.instances(name, near=True)
                if tag is None or tag in {t.lower() for t in i.tags}]

    def node_address(self, node: str) -> str | None:
        return self._member_address(node)


class _Discovery(Protocol):
    def index(self, name: str | None = None) -> int: ...

    def services(self) -> dict[str, dict[str, object]]: ...

    def instances(self, name: str, *, near: bool = False) -> list[Instance]: ...


class DnsResponder:
    """Bytes of a query in, bytes of the answer out (None: send nothing)."""

    def __init__(self, source: DnsSource, domain: str = DOMAIN,
                 clock: Callable[[], float] = time.monotonic, *,
                 service_ttl: int = 0, node_ttl: int = 0) -> None:
        for what, ttl in (("service", service_ttl), ("node", node_ttl)):
            if not 0 <= ttl <= MAX_TTL:
                raise ValueError(f"DNS {what} TTL must be 0 to {MAX_TTL} seconds, got {ttl}")
        self.source = source
        self.domain = domain.strip(".").lower()
        self.clock = clock
        self.service_ttl = service_ttl
        self.node_ttl = node_ttl
        self.stats: Counter[str] = Counter()
        # One cache per transport: the same question gets a cut answer over UDP.
        self._caches: tuple[dict[bytes, tuple[int, float, bytes]], ...] = ({}, {})

    def answer(self, data: bytes, *, tcp: bool = False) -> bytes | None:
        """The answer to the query ``data`` sized for its transport: over UDP (the
        default) at most 512 bytes or the client's EDNS0 size, cut with TC set; over
        TCP (``tcp=True``) the whole answer, up to 65535 bytes."""
        data = bytes(data)
        if len(data) < 12:
            self.stats["dropped_short"] += 1
            return _formerr(data) if len(data) >= 3 and not data[2] & 0x80 else None
        if data[2] & 0x80:  # QR set: a response, never answer it
            self.stats["dropped_responses"] += 1
            return None
        key = data[2:]
        cache = self._caches[tcp]
        hit = cache.get(key)
        now = self.clock()
        index = self.source.index()
        if hit is not None and hit[0] == index and now - hit[1] < CACHE_SECONDS:
            self.stats["cache_hits"] += 1
            return data[:2] + hit[2]
        reply = self._answer(data, tcp)
        if reply is not None:
            if len(cache) >= CACHE_ENTRIES:
                cache.clear()
            cache[key] = (index, now, reply[2:])
        return reply

    def _answer(self, data: bytes, tcp: bool) -> bytes | None:
        try:
            q = DNSRecord.parse(data)
        except Exception:  # dnslib raises DNSError and, on hostile bytes, others too
            self.stats["formerr"] += 1
            return _formerr(data)
        if q.header.opcode != 0:
            self.stats["notimp"] += 1
            return _rcode_only(q, RCODE.NOTIMP)
        if len(q.questions) != 1 or not _fits_dns(q.questions[0].qname):
            # dnslib parses names past DNS's limits (255 bytes in all) but cannot write
            # them back: answer FORMERR before building a reply that would not pack.
            self.stats["formerr"] += 1
            return _rcode_only(q, RCODE.FORMERR)
        limit = UDP_LIMIT
        edns = [rr for rr in q.ar if rr.rtype == QTYPE.OPT]
        if tcp:
            limit = TCP_LIMIT
        elif edns:
            limit = max(UDP_LIMIT, min(EDNS_LIMIT, int(edns[0].rclass)))
        question = q.questions[0]
        reply = DNSRecord(DNSHeader(id=q.header.id, qr=1, aa=1, ra=0, rd=q.header.rd),
                          q=question)
        if edns:
            reply.add_ar(EDNS0(udp_len=EDNS_LIMIT))
        self._fill(reply, question.qname, question.qtype)
        return _pack_within(reply, limit)

    def _fill(self, reply: DNSRecord, qname: DNSLabel, qtype: int) -> None:
        try:
            labels = [p.decode("ascii").lower() for p in qname.label]
        except UnicodeDecodeError:
            self._rcode(reply, RCODE.NXDOMAIN)
            return
        if not labels or labels[-1] != self.domain:
            self._rcode(reply, RCODE.REFUSED)
            return
        rest = labels[:-1]
        if len(rest) == 2 and rest[1] in ("node", "addr"):
            addr = (self.source.node_address(rest[0]) if rest[1] == "node"
                    else _unhex_address(rest[0]))
            if addr is None:
                self._rcode(reply, RCODE.NXDOMAIN)
                return
            self.stats["answered"] += 1
            _add_address(reply, qname, addr, qtype, self.node_ttl)
            return
        service, tag = _service_query(rest)
        instances = self.source.lookup(service, tag) if service else []
        if not instances:
            self._rcode(reply, RCODE.NXDOMAIN)
            return
        self.stats["answered"] += 1
        ttl = self.service_ttl
        targets: dict[str, str | None] = {}
        for inst in instances:
            if qtype in (QTYPE.A, QTYPE.AAAA, QTYPE.ANY):
                _add_address(reply, qname, inst.address, qtype, ttl)
            if qtype in (QTYPE.SRV, QTYPE.ANY):
                target, addr = self._target(inst)
                if target is None:
                    # An address DNS cannot spell as a name (over 63 characters, say).
                    self.stats["srv_unnamed"] += 1
                    continue
                reply.add_answer(RR(qname, QTYPE.SRV, ttl=ttl, rdata=SRV(
                    priority=1, weight=inst.weight, port=inst.port, target=target)))
                targets[target] = addr
        for target, addr in targets.items():
            if addr is not None:
                _add_address(reply, DNSLabel(target), addr, QTYPE.ANY, ttl, additional=True)

    def _target(self, inst: Instance) -> tuple[str | None, str | None]:
        """An SRV target for ``inst`` and the address to give for it (None: a host
        name, which we do not resolve). ``NODE.node.rumor.`` when the instance is at
        its agent's address; otherwise a name for its own address, so that two
        instances of one agent at different addresses never share a target."""
        if inst.address == self.source.node_address(inst.node):
            target = f"{inst.node}.node.{self.domain}."
            if _fits_dns_text(target):
                return target, inst.address
        try:
            ip = ipaddress.ip_address(inst.address)
        except ValueError:
            name = inst.address.rstrip(".") + "."
            return (name, None) if _fits_dns_text(name) else (None, None)
        return f"{ip.packed.hex()}.addr.{self.domain}.", inst.address

    def _rcode(self, reply: DNSRecord, rcode: int) -> None:
        self.stats[f"rcode_{RCODE.get(rcode)}".lower()] += 1
        reply.header.rcode = rcode


def _fits_dns(name: DNSLabel) -> bool:
    """Whether ``name`` is within DNS's limits: labels of 1-63 bytes, 255 in all."""
    labels = name.label
    return all(0 < len(p) <= 63 for p in labels) and sum(len(p) + 1 for p in labels) < 255


def _fits_dns_text(name: str) -> bool:
    try:
        return name.isascii() and _fits_dns(DNSLabel(name))
    except (UnicodeError, DNSLabelError):
        return False


def _service_query(labels: list[str]) -> tuple[str | None, str | None]:
    """(service, tag) for the supported service name forms, (None, None) otherwise."""
    if len(labels) == 2 and labels[1] == "service":
        return labels[0], None
    if len(labels) == 3 and labels[2] == "service":
        a, b = labels[0], labels[1]
        if a.startswith("_") and b.startswith("_"):  # RFC 2782: _web._tcp / _web._canary
            return a[1:], None if b in ("_tcp", "_udp") else b[1:]
        return b, a
    return None, None


def _unhex_address(text: str) -> str | None:
    """The address a ``HEX.addr.`` label spells (8 hex digits: IPv4, 32: IPv6)."""
    if len(text) not in (8, 32):
        return None
    try:
        return str(ipaddress.ip_address(bytes.fromhex(text)))
    except ValueError:
        return None


def _add_address(reply: DNSRecord, qname: DNSLabel, addr: str, qtype: int, ttl: int,
                 additional: bool = False) -> None:
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return  # a host name, not an address: nothing to put in an A record
    add = reply.add_ar if additional else reply.add_answer
    if ip.version == 4 and qtype in (QTYPE.A, QTYPE.ANY):
        add(RR(qname, QTYPE.A, ttl=ttl, rdata=A(str(ip))))
    elif ip.version == 6 and qtype in (QTYPE.AAAA, QTYPE.ANY):
        add(RR(qname, QTYPE.AAAA, ttl=ttl, rdata=AAAA(str(ip))))


def _pack_within(reply: DNSRecord, limit: int) -> bytes:
    """``reply`` packed in at most ``limit`` bytes. Additional records are a courtesy
    (RFC 2181 9): as many as fit are kept, and TC is set only when answers must go."""
    data: bytes = reply.pack()
    if len(data) <= limit:
        return data
    opt = [rr for rr in reply.ar if rr.rtype == QTYPE.OPT]
    extra = [rr for rr in reply.ar if rr.rtype != QTYPE.OPT]
    reply.ar = opt
    base: bytes = reply.pack()
    if len(base) <= limit:
        # Estimate how many fit from their mean size, then step down (names compress).
        keep = (limit - len(base)) * len(extra) // (len(data) - len(base))
        while keep > 0:
            reply.ar = opt + extra[:keep]
            data = reply.pack()
            if len(data) <= limit:
                return data
            keep -= max(1, keep // 16)
        reply.ar = opt
        return base
    reply.header.tc = 1
    while reply.rr:
        data = reply.pack()
        if len(data) <= limit:
            return data
        reply.rr = reply.rr[: max(0, min(len(reply.rr) - 1, len(reply.rr) * limit // len(data)))]
    packed: bytes = reply.pack()
    return packed


def _rcode_only(q: DNSRecord, rcode: int) -> bytes:
    r = DNSRecord(DNSHeader(id=q.header.id, qr=1, opcode=q.header.opcode, rcode=rcode,
                            rd=q.header.rd))
    data: bytes = r.pack()
    return data


def servfail(data: bytes) -> bytes | None:
    """A bare SERVFAIL for a query the responder failed on (a bug in rumor, not the
    client's fault), or None when ``data`` is too short to carry a query id."""
    return data[:2] + bytes([0x80, RCODE.SERVFAIL]) + bytes(8) if len(data) >= 12 else None


def _formerr(data: bytes) -> bytes:
    """A bare FORMERR header echoing the query id and opcode (the body did not parse)."""
    opcode = data[2] & 0x78 if len(data) > 2 else 0
    return data[:2] + bytes([0x80 | opcode, RCODE.FORMERR]) + bytes(8)
