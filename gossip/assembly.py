"""One node assembly for the agent and the simulator: the membership core and every
delegate the mesh runs on it, built by one function so that a simulated node is the
same machine as a real one and only the clock and the network differ.

A node is a ``Membership`` core with, in this order, the service catalog, the
cluster-wide queries (with the built-in ``ping`` and ``stats``, and the keyring commands
as a query when gossip is encrypted) and the ``extras`` its options ask for — policy
replication, which gossip does not know, is handed in by the
agent and the simulator alike as ``PolicyReplicator.factory(trust)``. The trio shells
(``node.py``, ``discovery.py``, ``cluster_keyring.py``, ``policy/runtime.py``) then
drive these parts; the simulator drives them directly.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .builtin_queries import register_builtins
from .catalog import Catalog, CatalogLimits
from .config import GossipConfig
from .delegate import Delegate
from .identity import Identity
from .keyring import KeyringSeal
from .keyring_commands import KeyringCommands, LegacyKeyringChannel
from .membership import Membership
from .query import Queries, QueryLimits
from .security import Seal
from .wire import Address, Meta


@dataclass(frozen=True)
class NodeSpec:
    """What a node is, apart from its clock and its network."""

    name: str
    addr: Address
    config: GossipConfig
    meta: Meta = field(default_factory=dict)
    seal: Seal | None = None
    #: Calendar time minus the core's clock: catalog epochs are calendar microseconds,
    #: policy documents expire by the calendar, the core's ``now`` is monotonic.
    wall_offset: float = 0.0
    #: Builders of further delegates (policy replication), registered after the
    #: catalog and the keyring commands.
    extras: Sequence[DelegateFactory] = ()
    #: What the catalog holds per node and in all (``catalog.CatalogLimits``).
    catalog_limits: CatalogLimits = field(default_factory=CatalogLimits)
    #: Whose word counts about whom (``identity.py``); None: nothing is signed.
    identity: Identity | None = None
    #: What one origin may ask of this node by query (``query.QueryLimits``).
    query_limits: QueryLimits = field(default_factory=QueryLimits)
    #: The release the ``ping`` query reports.
    release: str = "0+unknown"


#: Builds a delegate on a node's core; it may read the spec (its wall offset).
DelegateFactory = Callable[[Membership, NodeSpec], Delegate]


@dataclass
class NodeParts:
    """An assembled node: its core and the delegates registered on it."""

    core: Membership
    catalog: Catalog
    queries: Queries
    keyring: KeyringCommands | None
    #: The extras' delegates, by channel.
    extras: dict[str, Delegate]


def assemble(spec: NodeSpec, now: float, rng: random.Random,
             new_id: Callable[[], str]) -> NodeParts:
    """Build a node's core and delegates at ``now``; ``rng`` drives the protocol's
    choices, ``new_id`` names the node's queries (unique, not secret)."""
    core = Membership(spec.name, spec.addr, spec.config, rng, meta=dict(spec.meta),
                      seal=spec.seal, identity=spec.identity, now=now)
    # The epoch tells a restarted node's records from its previous life's.
    catalog = Catalog(core, epoch=int((now + spec.wall_offset) * 1_000_000), now=now,
                      wall_offset=spec.wall_offset, limits=spec.catalog_limits)
    core.register(catalog)
    # Signed record sets ride a channel of their own, which agents of the previous
    # build skip (see catalog.py); it sends nothing while the identity is off.
    core.register(catalog.signed_channel())
    queries = Queries(core, rand_id=new_id, now=now, wall_offset=spec.wall_offset,
                      limits=spec.query_limits,
                      services_of=lambda s: {
                          i.node for i in catalog.instances(s, include_critical=True)},
                      local_services=lambda: {r.service.name for r in catalog.local.values()})
    core.register(queries)
    register_builtins(queries, core, spec.release)
    keyring = None
    if isinstance(spec.seal, KeyringSeal):
        keyring = KeyringCommands(queries, spec.seal)
        core.register(LegacyKeyringChannel(core, keyring))
    extras: dict[str, Delegate] = {}
    for build in spec.extras:
        d = build(core, spec)
        core.register(d)
        extras[d.channel] = d
    return NodeParts(core, catalog, queries, keyring, extras)


__all__ = ["DelegateFactory", "NodeParts", "NodeSpec", "assemble"]
