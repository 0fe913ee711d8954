"""What a field arriving from the network may hold: the one set of rules and caps.

Every decoder of untrusted bytes (gossip messages, catalog records, the CLI's own
flags) checks names, addresses and counters against these rules, so a value that
would make a later step raise (a NUL byte in an address handed to ``sendto``, a label
IDNA cannot encode, an incarnation whose successor no longer fits msgpack's 64 bits)
is refused where it enters, once, and never reaches the code that acts on it.

Why member addresses are IP literals: a host name in a gossiped address would make
every agent resolve names chosen by whoever sent the packet (a DNS request per
datagram, and a lookup an attacker controls); memberlist carries IP bytes for the
same reason. Agents resolve their own advertised name once, at start.
"""

from __future__ import annotations

import ipaddress

#: Incarnations, epochs and revisions stay exact as JSON numbers and floats, and
#: their successors fit msgpack's unsigned 64 bits with room to spare.
MAX_COUNTER = 2**53 - 1
#: An incarnation this far above what we hold for a member is absurd: no member
#: refutes or changes its metadata sixteen million times between two of our updates
#: about it. Such a message is dropped, so a forged accusation cannot push a victim
#: out of the counter space (a victim must always be able to outbid it by one).
MAX_INCARNATION_JUMP = 2**24
#: Member and node names: what an operator types for ``--name``.
MAX_NAME = 128
#: Longest IP address text (IPv6 with an embedded IPv4 part).
_MAX_IP_TEXT = 45
_IP_CHARS = frozenset("0123456789abcdefABCDEF.:")


def valid_name(v: object) -> bool:
    """A member name: 1 to ``MAX_NAME`` printable characters (no NUL, no control
    characters, no line breaks: names end up in logs, DNS answers and metrics)."""
    return type(v) is str and 0 < len(v) <= MAX_NAME and v.isprintable()


def valid_text(v: object, limit: int) -> bool:
    """A tag key or value, a channel name: printable and at most ``limit`` long."""
    return type(v) is str and len(v) <= limit and v.isprintable()


def ip_literal(v: object) -> str | None:
    """``v`` in its canonical form if it is an IPv4 or IPv6 address literal (no zone
    index, which could carry any byte), else None."""
    if type(v) is not str or not 0 < len(v) <= _MAX_IP_TEXT or not _IP_CHARS.issuperset(v):
        return None
    try:
        return ipaddress.ip_address(v).compressed
    except ValueError:
        return None


def valid_port(v: object) -> bool:
    """A port a member can listen on: 1 to 65535 (0 cannot be sent to)."""
    return type(v) is int and 0 < v <= 65535


def valid_counter(v: object) -> bool:
    """An incarnation, epoch, revision or sequence number: 0 to ``MAX_COUNTER``."""
    return type(v) is int and 0 <= v <= MAX_COUNTER


def valid_hostname(v: object) -> bool:
    """A DNS host name (letters, digits, hyphens and, as container names have them,
    underscores; labels of 1 to 63, at most 253 in all) or an IP literal: what a
    service record may give as its address."""
    if ip_literal(v) is not None:
        return True
    if type(v) is not str or not 0 < len(v) <= 253 or not v.isascii():
        return False
    labels = v[:-1].split(".") if v.endswith(".") else v.split(".")
    return all(0 < len(lb) <= 63 and lb.replace("-", "").replace("_", "").isalnum()
               and not lb.startswith("-") and not lb.endswith("-") for lb in labels)


def describe(v: object) -> str:
    """A short, safe description of an untrusted value for an error message: its type
    and size, never its ``repr`` (which recurses into nesting and echoes any bytes)."""
    if isinstance(v, (list, tuple, dict, str, bytes)):
        return f"{type(v).__name__} of {len(v)}"
    if type(v) is int:
        return "an integer" if abs(v) < 2**63 else "a huge integer"
    return type(v).__name__
