"""DNS interface to the catalog: A and SRV records for ``NAME.service.rumor.``.

Applications that cannot call the API resolve services the way they resolve anything
else. The agent answers from its own replicated catalog, like Consul's DNS interface:

- ``NAME.service.rumor.`` and ``TAG.NAME.service.rumor.`` (also the RFC 2782 forms
  ``_NAME._tcp.service.rumor.`` and ``_NAME._TAG.service.rumor.``): A (or AAAA)
  records with the instances' addresses, SRV records with their ports, weights and a
  target ``NODE.node.rumor.`` whose address goes in the additional section;
- ``NODE.node.rumor.``: the agent's address;
- critical instances are never returned; nearest first (the probe RTT this agent
  measured), TTL 0 so clients come back for fresh answers;
- NXDOMAIN for names under ``rumor.`` that match nothing, REFUSED for names outside
  (we are not a recursive resolver), FORMERR for packets that do not parse or do not
  carry exactly one question, NOTIMP for opcodes other than QUERY; responses are
  never answered (no reflection loops). Answers that do not fit the UDP size (512, or
  the client's EDNS0 size up to 4096) are cut with the TC bit set.

Wire format is dnslib's (a well-kept, pure-Python codec). ``DnsResponder.answer`` is
sans-IO (bytes in, bytes out); ``serve_dns`` is the trio UDP loop. Answers are cached
per question bytes for up to a second and only while the catalog index is unchanged,
so a busy resolver costs one dictionary lookup per query.
"""

from __future__ import annotations

import ipaddress
import logging
import socket as pysocket
import time
from collections import Counter
from collections.abc import Callable
from typing import Protocol

import trio
from dnslib import AAAA, EDNS0, QTYPE, RCODE, RR, SRV, A, DNSHeader, DNSLabel, DNSRecord
from dnslib.label import DNSLabelError

from ...gossip.catalog import Instance

log = logging.getLogger("rumor.dns")

DOMAIN = "rumor"
UDP_LIMIT = 512
EDNS_LIMIT = 4096
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
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.source = source
        self.domain = domain.strip(".").lower()
        self.clock = clock
        self.stats: Counter[str] = Counter()
        self._cache: dict[bytes, tuple[int, float, bytes]] = {}

    def answer(self, data: bytes) -> bytes | None:
        data = bytes(data)
        if len(data) < 12:
            self.stats["dropped_short"] += 1
            return _formerr(data) if len(data) >= 3 and not data[2] & 0x80 else None
        if data[2] & 0x80:  # QR set: a response, never answer it
            self.stats["dropped_responses"] += 1
            return None
        key = data[2:]
        hit = self._cache.get(key)
        now = self.clock()
        index = self.source.index()
        if hit is not None and hit[0] == index and now - hit[1] < CACHE_SECONDS:
            self.stats["cache_hits"] += 1
            return data[:2] + hit[2]
        reply = self._answer(data)
        if reply is not None:
            if len(self._cache) >= CACHE_ENTRIES:
                self._cache.clear()
            self._cache[key] = (index, now, reply[2:])
        return reply

    def _answer(self, data: bytes) -> bytes | None:
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
        if edns:
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
        if len(rest) == 2 and rest[1] == "node":
            addr = self.source.node_address(rest[0])
            if addr is None:
                self._rcode(reply, RCODE.NXDOMAIN)
                return
            self.stats["answered"] += 1
            _add_address(reply, qname, addr, qtype)
            return
        service, tag = _service_query(rest)
        instances = self.source.lookup(service, tag) if service else []
        if not instances:
            self._rcode(reply, RCODE.NXDOMAIN)
            return
        self.stats["answered"] += 1
        targets: dict[str, str] = {}
        for inst in instances:
            if qtype in (QTYPE.A, QTYPE.AAAA, QTYPE.ANY):
                _add_address(reply, qname, inst.address, qtype)
            if qtype in (QTYPE.SRV, QTYPE.ANY):
                target = f"{inst.node}.node.{self.domain}."
                if not _fits_dns_text(target):
                    # A member name DNS cannot spell (over 63 characters, say): no SRV.
                    self.stats["srv_unnamed"] += 1
                    continue
                reply.add_answer(RR(qname, QTYPE.SRV, ttl=0, rdata=SRV(
                    priority=1, weight=inst.weight, port=inst.port, target=target)))
                targets[target] = inst.address
        for target, addr in targets.items():
            _add_address(reply, DNSLabel(target), addr, QTYPE.ANY, additional=True)

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


def _add_address(reply: DNSRecord, qname: DNSLabel, addr: str, qtype: int,
                 additional: bool = False) -> None:
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return  # a host name, not an address: nothing to put in an A record
    add = reply.add_ar if additional else reply.add_answer
    if ip.version == 4 and qtype in (QTYPE.A, QTYPE.ANY):
        add(RR(qname, QTYPE.A, ttl=0, rdata=A(str(ip))))
    elif ip.version == 6 and qtype in (QTYPE.AAAA, QTYPE.ANY):
        add(RR(qname, QTYPE.AAAA, ttl=0, rdata=AAAA(str(ip))))


def _pack_within(reply: DNSRecord, limit: int) -> bytes:
    data: bytes = reply.pack()
    if len(data) <= limit:
        return data
    reply.ar = [rr for rr in reply.ar if rr.rtype == QTYPE.OPT]
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


def _formerr(data: bytes) -> bytes:
    """A bare FORMERR header echoing the query id and opcode (the body did not parse)."""
    opcode = data[2] & 0x78 if len(data) > 2 else 0
    return data[:2] + bytes([0x80 | opcode, RCODE.FORMERR]) + bytes(8)


async def serve_dns(responder: DnsResponder, host: str = "127.0.0.1", port: int = 8600, *,
                    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """Answer DNS over UDP on host:port until cancelled; reports the bound port."""
    family = pysocket.AF_INET6 if ":" in host else pysocket.AF_INET
    sock = trio.socket.socket(family, pysocket.SOCK_DGRAM)
    with sock:
        await sock.bind((host, port))
        task_status.started(sock.getsockname()[1])
        while True:
            data, addr = await sock.recvfrom(EDNS_LIMIT)
            try:
                reply = responder.answer(data)
            except Exception:
                # A bug in rumor, not the client's fault: log it, answer SERVFAIL, go on.
                log.exception("DNS query from %s failed", addr[0])
                responder.stats["servfail"] += 1
                reply = data[:2] + bytes([0x80, RCODE.SERVFAIL]) + bytes(8) \
                    if len(data) >= 12 else None
            if reply is None:
                continue
            try:
                await sock.sendto(reply, addr)
            except OSError as e:  # a full buffer loses one answer; the client retries
                responder.stats["send_errors"] += 1
                log.debug("DNS reply to %s failed: %s", addr[0], e)
