"""Network conditions as nftables rules on the lab's switch, and the byte counters.

Every frame between two lab hosts crosses the switch namespace's bridge, so one
``bridge`` table there sees all of it: ``iifname`` is the sending host's port,
``oifname`` the receiving one's. The table has a base chain that first jumps to
``count`` (per host: UDP and TCP packets and bytes *sent*, before any loss, as the
simulator counts ``bytes_out``) and then to ``faults``, which is replaced whole and
atomically (one ``nft -f`` transaction) each time the scenario changes the conditions.

Only UDP and TCP are ever dropped: ARP and neighbour discovery keep working across a
partition, as on a real network whose links are up while a firewall or a routing
fault eats the traffic; a healed partition then carries packets at once.

Pure: rules are rendered to text here, run by ``kernel.py``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

TABLE = "rumor_lab"
PROTOCOLS = ("udp", "tcp")
#: numgen's modulus: loss rates have a resolution of one in a million.
RESOLUTION = 1_000_000


@dataclass(frozen=True, slots=True)
class Cut:
    """Traffic from ports ``a`` to ports ``b`` (everyone else when empty) is dropped,
    and back again when ``symmetric``; ``protocols`` narrows it (block UDP alone)."""

    a: frozenset[str]
    b: frozenset[str] = frozenset()
    symmetric: bool = True
    protocols: tuple[str, ...] = PROTOCOLS


@dataclass(frozen=True, slots=True)
class Conditions:
    #: Probability that a packet of ``loss_protocols`` is dropped, on every link.
    loss: float = 0.0
    loss_protocols: tuple[str, ...] = PROTOCOLS
    cuts: tuple[Cut, ...] = ()

    def __post_init__(self) -> None:
        if not 0.0 <= self.loss <= 1.0:
            raise ValueError(f"loss must be from 0 to 1, not {self.loss}")
        for p in (*self.loss_protocols, *(p for c in self.cuts for p in c.protocols)):
            if p not in PROTOCOLS:
                raise ValueError(f"unknown protocol {p!r}: expected udp or tcp")


@dataclass(frozen=True, slots=True)
class Counts:
    """What one host sent, as the kernel counted it (IP packets, IP bytes)."""

    udp_packets: int = 0
    udp_bytes: int = 0
    tcp_packets: int = 0
    tcp_bytes: int = 0
    #: Connection openings (SYN without ACK, retransmissions included) and answers.
    syn_packets: int = 0
    synack_packets: int = 0

    def udp_payload(self, family: int) -> int:
        """UDP payload: IP bytes less the IP and UDP headers (no IP options here)."""
        return self.udp_bytes - self.udp_packets * (48 if family == 6 else 28)

    def tcp_payload(self, family: int) -> int:
        """TCP payload, estimated: Linux sends timestamps on every segment (a 32-byte
        TCP header) and SYN/SYN-ACK with 40 bytes of header; SACK blocks after a loss
        make this a slight overcount of the payload under loss."""
        ip = 40 if family == 6 else 20
        return (self.tcp_bytes - self.tcp_packets * (ip + 32)
                - (self.syn_packets + self.synack_packets) * (40 - 32))


def _set(ports: Iterable[str]) -> str:
    return "{ " + ", ".join(f'"{p}"' for p in sorted(ports)) + " }"


def _protos(ps: Sequence[str]) -> str:
    return ps[0] if len(ps) == 1 else "{ " + ", ".join(ps) + " }"


def table_script(ports: Sequence[str]) -> str:
    """The whole table: counters for ``ports`` and an empty ``faults`` chain."""
    count = []
    for p in ports:
        count.append(f'iifname "{p}" meta l4proto udp counter comment "{p} udp"')
        count.append(f'iifname "{p}" tcp flags & (syn | ack) == syn counter '
                     f'comment "{p} syn"')
        count.append(f'iifname "{p}" tcp flags & (syn | ack) == syn | ack counter '
                     f'comment "{p} synack"')
        count.append(f'iifname "{p}" meta l4proto tcp counter comment "{p} tcp"')
    lines = [f"table bridge {TABLE} {{",
             "  chain count {", *(f"    {r}" for r in count), "  }",
             "  chain faults {", "  }",
             "  chain forward {",
             "    type filter hook forward priority 0; policy accept;",
             "    jump count", "    jump faults", "  }", "}"]
    return "\n".join(lines) + "\n"


def fault_rules(c: Conditions, ports: Sequence[str]) -> list[str]:
    rules: list[str] = []
    for cut in c.cuts:
        b = cut.b or frozenset(ports) - cut.a
        if not cut.a or not b:
            continue
        proto = _protos(cut.protocols)
        rules.append(f"iifname {_set(cut.a)} oifname {_set(b)} meta l4proto {proto} "
                     "counter drop")
        if cut.symmetric:
            rules.append(f"iifname {_set(b)} oifname {_set(cut.a)} meta l4proto {proto} "
                         "counter drop")
    if c.loss > 0.0:
        n = round(c.loss * RESOLUTION)
        rules.append(f"meta l4proto {_protos(c.loss_protocols)} numgen random mod "
                     f"{RESOLUTION} < {n} counter drop")
    return rules


def faults_script(c: Conditions, ports: Sequence[str]) -> str:
    """One transaction that replaces the ``faults`` chain's rules with ``c``'s."""
    lines = [f"flush chain bridge {TABLE} faults"]
    lines += [f"add rule bridge {TABLE} faults {r}" for r in fault_rules(c, ports)]
    return "\n".join(lines) + "\n"


def dropped(nft_json: str) -> int:
    """Packets the ``faults`` chain dropped (``nft -j list chain ... faults``)."""
    try:
        objects = json.loads(nft_json)["nftables"]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"unreadable nft counters: {e}") from None
    return sum(int(e["counter"].get("packets", 0)) for obj in objects
               if isinstance(obj, dict) and isinstance(obj.get("rule"), dict)
               for e in obj["rule"].get("expr", ()) if isinstance(e, dict) and "counter" in e)


def parse_counters(nft_json: str) -> dict[str, Counts]:
    """``nft -j list chain bridge rumor_lab count`` → per port counts."""
    try:
        doc = json.loads(nft_json)
        objects: list[dict[str, Any]] = doc["nftables"]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"unreadable nft counters: {e}") from None
    raw: dict[str, dict[str, int]] = {}
    for obj in objects:
        rule = obj.get("rule") if isinstance(obj, dict) else None
        if not isinstance(rule, dict):
            continue
        comment = rule.get("comment")
        counter = next((e["counter"] for e in rule.get("expr", ())
                        if isinstance(e, dict) and "counter" in e), None)
        if not isinstance(comment, str) or not isinstance(counter, dict):
            continue
        port, _, kind = comment.partition(" ")
        entry = raw.setdefault(port, {})
        entry[f"{kind}_packets"] = int(counter.get("packets", 0))
        entry[f"{kind}_bytes"] = int(counter.get("bytes", 0))
    return {port: Counts(udp_packets=v.get("udp_packets", 0),
                         udp_bytes=v.get("udp_bytes", 0),
                         tcp_packets=v.get("tcp_packets", 0),
                         tcp_bytes=v.get("tcp_bytes", 0),
                         syn_packets=v.get("syn_packets", 0),
                         synack_packets=v.get("synack_packets", 0))
            for port, v in raw.items()}
