"""What the proxies need to know of the mesh, and nothing more.

The listeners depend on ``MeshView``, a small protocol (which instances of a service
can take traffic and through which sidecar, the local instances, the catalog's change
counter), not on the gossip ``Node``. The agent passes a ``NodeView`` over its node;
tests and the simulator pass a fake with the same three questions answered from a
table, so the whole request pipeline runs in process on virtual time.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

from ..gossip.address import parse_address
from ..gossip.node import Node
from ..gossip.service_spec import HTTP, protocol_of
from .attempts import Endpoint
from .protocols import carries_of

#: Member tag through which an agent advertises its inbound listener.
INBOUND_TAG = "rumor.inbound"


@dataclass(frozen=True, slots=True)
class LocalInstance:
    """An instance this agent serves: where its local process listens."""

    id: str
    host: str
    port: int
    weight: int
    #: Its endpoint key as callers know it ("node/id").
    key: str = ""
    #: What it speaks (``protocols.py``).
    protocol: str = HTTP


class MeshView(Protocol):
    @property
    def version(self) -> int:
        """Changes whenever the answers below may have (the catalog's index)."""
        ...

    def endpoints(self, service: str) -> list[Endpoint]:
        """The visible, non-critical instances of ``service`` that a sidecar fronts
        (an instance without one has nothing to enforce its access policy)."""
        ...

    def knows(self, service: str) -> bool:
        """Whether any instance of ``service`` is known, critical ones included."""
        ...

    def local_instances(self, service: str) -> Iterator[LocalInstance]:
        """The instances of ``service`` this agent serves itself."""
        ...


class NodeView:
    """``MeshView`` over a running gossip node."""

    __slots__ = ("node",)

    def __init__(self, node: Node) -> None:
        self.node = node

    @property
    def version(self) -> int:
        return self.node.parts.catalog.index

    def endpoints(self, service: str) -> list[Endpoint]:
        members = self.node.core.members
        out: list[Endpoint] = []
        for inst in self.node.parts.catalog.instances(service):
            m = members.get(inst.node)
            inbound = m.meta.get(INBOUND_TAG) if m is not None else None
            if not inbound:
                continue
            try:
                host, port = parse_address(inbound)
            except ValueError:
                continue
            out.append(Endpoint(f"{inst.node}/{inst.id}", inst.node, inst.id, inst.version,
                                inst.tags, host, port, inst.rtt, inst.weight,
                                protocol_of(inst.tags),
                                carries_of(m.meta) if m is not None else frozenset()))
        return out

    def knows(self, service: str) -> bool:
        return bool(self.node.parts.catalog.instances(service, include_critical=True))

    def local_instances(self, service: str) -> Iterator[LocalInstance]:
        for sid, ls in self.node.parts.catalog.local.items():
            s = ls.service
            if s.name == service:
                yield LocalInstance(sid, s.address or "127.0.0.1", s.port, s.weight,
                                    f"{self.node.name}/{sid}", s.protocol)


__all__ = ["INBOUND_TAG", "LocalInstance", "MeshView", "NodeView"]
