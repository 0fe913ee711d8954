"""The lab's network as data: hosts, addresses and the commands that build it.

Nothing here runs a command. ``Topology`` names every namespace and link of one lab
and ``build_steps`` lists the ``ip``/``sysctl`` commands that make them, in order, so
the shell (``kernel.py``) can write each down in the ledger before running it.

Shape: one namespace per host (``<lab>-n0`` ...), each with a veth ``eth0`` whose
peer (``n0`` ...) sits in a switch namespace (``<lab>-sw``) on the bridge ``br0``.
Nothing is created in the namespace the lab runs from: no address of the lab exists
outside its own namespaces, and deleting the namespaces removes every link, address,
nftables table and iptables rule the lab made. IPv6 duplicate-address detection is
off on every lab link (a tentative address would refuse to bind for a second or two,
which the agents would see as a bind error).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

#: IPv4 and IPv6 (a unique-local prefix) of the lab's hosts; host i gets .i+1 / ::i+1.
IPV4_PREFIX = "10.211"
IPV6_PREFIX = "fd00:211::"
#: Lab ids: short, so that ``<id>-n199`` stays well inside the 15 bytes of an
#: interface name and every namespace of one lab shares a prefix no one else uses.
LAB_ID = re.compile(r"^rl[0-9a-f]{4}$")
MAX_HOSTS = 250


@dataclass(frozen=True, slots=True)
class Host:
    index: int
    lab: str

    @property
    def name(self) -> str:
        """The agent's node name and the suffix of its namespace: the simulator's
        names (``n0``, ``n1``, ...), so that messages carry the same bytes on both."""
        return f"n{self.index}"

    @property
    def netns(self) -> str:
        return f"{self.lab}-{self.name}"

    @property
    def port(self) -> str:
        """Its veth peer on the switch's bridge (``iifname`` in the switch's rules)."""
        return self.name

    @property
    def ipv4(self) -> str:
        hi, lo = divmod(self.index + 1, 256)
        return f"{IPV4_PREFIX}.{hi}.{lo}"

    @property
    def ipv6(self) -> str:
        return f"{IPV6_PREFIX}{self.index + 1:x}"

    def address(self, family: int) -> str:
        return self.ipv6 if family == 6 else self.ipv4


@dataclass(frozen=True, slots=True)
class Step:
    """One command; ``what`` is the line the ledger and ``--verbose`` show."""

    what: str
    argv: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Topology:
    lab: str
    hosts: tuple[Host, ...]

    @classmethod
    def of(cls, lab: str, n: int) -> Topology:
        if not LAB_ID.match(lab):
            raise ValueError(f"bad lab id {lab!r}: expected rl and 4 hex digits")
        if not 1 <= n <= MAX_HOSTS:
            raise ValueError(f"a lab has 1 to {MAX_HOSTS} hosts, not {n}")
        return cls(lab, tuple(Host(i, lab) for i in range(n)))

    @property
    def switch(self) -> str:
        return f"{self.lab}-sw"

    @property
    def namespaces(self) -> tuple[str, ...]:
        """Every namespace of the lab, the switch first."""
        return (self.switch, *(h.netns for h in self.hosts))

    def host(self, name: str) -> Host:
        for h in self.hosts:
            if h.name == name:
                return h
        raise KeyError(name)


def _no_dad(netns: str) -> Step:
    return Step(f"{netns}: IPv6 duplicate-address detection off",
                ("ip", "netns", "exec", netns, "sysctl", "-qw",
                 "net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0",
                 "net.ipv6.conf.all.dad_transmits=0",
                 "net.ipv6.conf.default.dad_transmits=0"))


def switch_steps(t: Topology) -> list[Step]:
    """After ``ip netns add`` of the switch: its bridge, up, with loopback."""
    sw = t.switch
    return [
        _no_dad(sw),
        Step(f"{sw}: bridge br0", ("ip", "-n", sw, "link", "add", "br0", "type", "bridge")),
        Step(f"{sw}: br0 up", ("ip", "-n", sw, "link", "set", "br0", "up")),
        Step(f"{sw}: lo up", ("ip", "-n", sw, "link", "set", "lo", "up")),
    ]


def host_steps(t: Topology, h: Host) -> list[Step]:
    """After ``ip netns add`` of the host: its veth to the switch, addresses, up."""
    ns, sw = h.netns, t.switch
    return [
        _no_dad(ns),
        Step(f"{ns}: veth eth0 <-> {sw}/{h.port}",
             ("ip", "-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name",
              h.port, "netns", sw)),
        Step(f"{sw}: {h.port} on br0", ("ip", "-n", sw, "link", "set", h.port,
                                        "master", "br0", "up")),
        Step(f"{ns}: {h.ipv4}/16", ("ip", "-n", ns, "addr", "add", f"{h.ipv4}/16",
                                    "dev", "eth0")),
        Step(f"{ns}: {h.ipv6}/64", ("ip", "-n", ns, "addr", "add", f"{h.ipv6}/64",
                                    "dev", "eth0", "nodad")),
        Step(f"{ns}: eth0 up", ("ip", "-n", ns, "link", "set", "eth0", "up")),
        Step(f"{ns}: lo up", ("ip", "-n", ns, "link", "set", "lo", "up")),
    ]
