"""What a service speaks, what a sidecar carries, and how a connection says which.

Protocols are declared, never guessed (Linkerd's detection stalls server-speaks-first
protocols for seconds). A service registers ``protocol=tcp`` (or ``http``, the default,
``http2``, ``grpc``); the declaration travels as a service tag, ``rumor.protocol=tcp``,
because a catalog record has a fixed number of fields and an older agent drops a
message with a record it cannot read, while it keeps an unknown tag as a tag.

What an agent's inbound listener accepts besides HTTP/1.1 is a member tag,
``rumor.carries`` (``h2,tcp``). A caller's sidecar sends HTTP/2 or mesh TCP only to an
instance whose agent advertises it, so an agent of an older build is sent only what it
understands.

On one listener the first bytes of a connection tell its protocol apart exactly:
the HTTP/2 client preface is a fixed 24-byte string, and a sidecar's mesh TCP
connection starts with ``TCP_MAGIC``, whose NUL byte no HTTP/1.1 request (a method is a
token) or HTTP/2 preface can start with. ``sniff`` compares prefixes; it never weighs
likelihoods.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

# The declaration itself is the registration's (gossip/service_spec.py), which must not
# import the proxy.
from ..gossip.service_spec import (
    GRPC,
    HTTP,
    HTTP2,
    PROTOCOL_TAG,
    PROTOCOLS,
    RESERVED_TAG_PREFIX,
    TCP,
    protocol_of,
    protocol_tags,
)

#: Services whose requests travel as HTTP/2 streams between the sidecars.
H2_PROTOCOLS = frozenset({HTTP2, GRPC})

#: The member tag listing what the agent's inbound listener accepts beyond HTTP/1.1.
CARRIES_TAG = "rumor.carries"
CARRIES_H2 = "h2"
CARRIES_TCP = "tcp"
#: What an agent of this build carries.
CARRIED = (CARRIES_H2, CARRIES_TCP)

#: The HTTP/2 client connection preface (RFC 9113 §3.4).
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
#: The first bytes of a mesh TCP connection between sidecars (``tcp_preamble.py``).
TCP_MAGIC = b"\x00rumor-tcp\x00"

Sniffed = Literal["h1", "h2", "tcp"]
_MARKS: tuple[tuple[Sniffed, bytes], ...] = (("h2", H2_PREFACE), ("tcp", TCP_MAGIC))


def carries_of(meta: Mapping[str, str]) -> frozenset[str]:
    """What a member's inbound accepts beyond HTTP/1.1, from its tags (empty for an
    agent older than the tag)."""
    raw = meta.get(CARRIES_TAG, "")
    return frozenset(p for p in raw.split(",") if p in CARRIED)


def carries_tag() -> str:
    return ",".join(CARRIED)


def sniff(first: bytes) -> Sniffed | None:
    """Which protocol a connection whose first bytes are ``first`` speaks; None while
    ``first`` is a proper prefix of the preface or of the magic (read more)."""
    if not first:
        return None
    for proto, mark in _MARKS:
        n = min(len(first), len(mark))
        if first[:n] == mark[:n]:
            return proto if len(first) >= len(mark) else None
    return "h1"


#: Bytes ``sniff`` may need before it decides.
SNIFF_BYTES = max(len(H2_PREFACE), len(TCP_MAGIC))

__all__ = ["CARRIED", "CARRIES_TAG", "GRPC", "H2_PREFACE", "H2_PROTOCOLS", "HTTP", "HTTP2",
           "PROTOCOLS", "PROTOCOL_TAG", "RESERVED_TAG_PREFIX", "SNIFF_BYTES", "TCP",
           "TCP_MAGIC", "carries_of", "carries_tag", "protocol_of", "protocol_tags", "sniff"]
