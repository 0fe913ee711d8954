"""How many connections each sidecar listener may hold, decided once at start (sans-IO).

The two listeners face different people: the inbound one the network (any host that
reaches its port), the outbound one this host's own applications. Sharing one pool
let 1,000 silent connections from one remote host stop the host's own outbound
calls. So the sidecar's share of the descriptors (``FdBudget.proxy``) is split in two
pools, one per listener, and each listener caps the connections one client address
may hold at once below its pool, so a single host can never fill it:

- with both listeners each gets half of the share (a proxied connection costs two
  descriptors: the client's and its upstream's); with one, it gets all of it;
- an explicit ``--inbound-connections``/``--outbound-connections`` is used as given
  when the share allows it, else cut to the share (and said so);
- per client: at most a quarter of the inbound pool (and never more than 1,024, what a
  calling sidecar's own pool keeps open), three quarters of the outbound one (all
  local applications are usually one address, 127.0.0.1, but containers are not); an
  explicit ``--*-per-client`` must stay below its pool.

A connection must also start talking: one that sends no byte of a request within
``first_byte_timeout`` of being accepted is closed (``relay.ProxyLimits``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

#: Descriptors one proxied connection costs: the client's and its upstream's.
FDS_PER_CONNECTION = 2
#: A calling sidecar pools its connections: more than this from one host is a flood.
INBOUND_MAX_PER_CLIENT = 1024
#: Seconds a new connection may stay silent before its first request byte.
FIRST_BYTE_TIMEOUT = 5.0


@dataclass(frozen=True, slots=True)
class SidecarLimits:
    """What the operator asked for (0: decide from the descriptor budget)."""

    inbound_connections: int = 0
    outbound_connections: int = 0
    inbound_per_client: int = 0
    outbound_per_client: int = 0
    first_byte_timeout: float = FIRST_BYTE_TIMEOUT


@dataclass(frozen=True, slots=True)
class ListenerShare:
    """One listener's pool: connections at once (``math.inf``: no limit), and at once
    from one client address (0: no cap)."""

    connections: float
    per_client: int

    @property
    def fds(self) -> float:
        return self.connections * FDS_PER_CONNECTION


@dataclass(frozen=True, slots=True)
class SidecarPlan:
    inbound: ListenerShare
    outbound: ListenerShare
    #: What was cut to fit the budget, for the log.
    notes: tuple[str, ...] = ()

    def describe(self) -> str:
        def one(s: ListenerShare) -> str:
            per = f", {s.per_client} per client" if s.per_client else ""
            return f"{s.connections:g} connections{per}"
        return f"inbound {one(self.inbound)}; outbound {one(self.outbound)}"


def plan_pools(proxy_fds: float, limits: SidecarLimits, *, inbound: bool = True,
               outbound: bool = True) -> SidecarPlan:
    """Split ``proxy_fds`` descriptors between the listeners that run (module doc)."""
    total = proxy_fds // FDS_PER_CONNECTION if math.isfinite(proxy_fds) else math.inf
    both = inbound and outbound
    default = total // 2 if both and math.isfinite(total) else total
    notes: list[str] = []

    def size(asked: int, what: str) -> float:
        if not asked:
            return max(1, default) if math.isfinite(default) else default
        if asked > default:
            cut = max(1, default)
            notes.append(f"--{what}-connections {asked} cut to {cut:g}: the descriptor "
                         f"limit leaves {proxy_fds:g} for the sidecar")
            return cut
        return asked

    def per_client(conns: float, asked: int, share: float, ceiling: int) -> int:
        if asked:
            return asked if conns > asked else max(1, int(conns) - 1)
        if not math.isfinite(conns):
            return ceiling
        cap = max(1, int(conns * share))
        return min(cap, ceiling) if ceiling else cap

    in_conns = size(limits.inbound_connections, "inbound")
    out_conns = size(limits.outbound_connections, "outbound")
    return SidecarPlan(
        ListenerShare(in_conns, per_client(in_conns, limits.inbound_per_client, 0.25,
                                           INBOUND_MAX_PER_CLIENT)),
        ListenerShare(out_conns, per_client(out_conns, limits.outbound_per_client, 0.75, 0)),
        tuple(notes))


def check_limits(limits: SidecarLimits) -> str | None:
    """What is wrong with the operator's settings (None: nothing): a per-client cap
    must stay below its pool, else one host could fill it again."""
    for side in ("inbound", "outbound"):
        conns = getattr(limits, f"{side}_connections")
        per = getattr(limits, f"{side}_per_client")
        if conns and per and per >= conns:
            return (f"--{side}-per-client {per} must be below --{side}-connections "
                    f"{conns} (one host must not be able to fill the pool)")
    if not 0 < limits.first_byte_timeout < 1e6:
        return "--first-byte-timeout must be a positive number of seconds"
    return None
