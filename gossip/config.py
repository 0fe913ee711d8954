"""Gossip settings and the three profiles (``lan``, ``wan``, ``local``).

The timing formulas are memberlist's, so operators who know Serf or Consul can read
rumor's behaviour off the same numbers:

* probe timeout is scaled by the local-health (awareness) multiplier:
  ``probe_timeout * (awareness + 1)``;
* suspicion timeout minimum: ``suspicion_mult * max(1, log10(n)) * probe_interval``;
  maximum: ``suspicion_max_mult * minimum``; with C independent confirmations the
  timeout is ``max(min, max - (max - min) * log(C + 1) / log(K + 1))`` where K is
  ``suspicion_confirmations`` (3, as in the Lifeguard paper; memberlist uses 2);
* every broadcast is sent ``retransmit_mult * ceil(log10(n + 1))`` times;
* push-pull runs every ``push_pull_interval`` up to 32 members and every
  ``push_pull_interval * (ceil(log2(n) - log2(32)) + 1)`` beyond, so anti-entropy
  traffic per member stays flat as the cluster grows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

#: Largest datagram we ever send: fits a 1,500-byte Ethernet MTU with IP/UDP headers
#: and room for the encryption envelope added by a later layer.
SAFE_DATAGRAM = 1400


@dataclass(frozen=True, slots=True)
class GossipConfig:
    """Tunables of the SWIM/Lifeguard core. Times are in seconds."""

    #: One member is probed per period (SWIM's protocol period T).
    probe_interval: float = 1.0
    #: Wait this long for a direct ack before asking others to probe indirectly.
    probe_timeout: float = 0.5
    #: Members asked to probe indirectly (SWIM's k).
    indirect_checks: int = 3
    #: Probe the target over TCP beside the indirect probes, so a host whose UDP is
    #: blocked is reported as such instead of flapping between alive and suspect.
    tcp_fallback_probe: bool = True
    #: Lifeguard local-health: the probe timeout is multiplied by (score + 1).
    awareness_max_multiplier: int = 8
    #: Lifeguard on/off as a whole (awareness, dynamic suspicion, nacks, buddy system);
    #: off gives plain SWIM with a fixed suspicion timeout, for comparisons.
    lifeguard: bool = True
    suspicion_mult: int = 4
    suspicion_max_mult: int = 6
    #: Independent confirmations (K) that shrink a suspicion timeout to its minimum.
    suspicion_confirmations: int = 3
    retransmit_mult: int = 4
    gossip_interval: float = 0.2
    gossip_nodes: int = 3
    #: Keep gossiping to a failed or left member this long, so that one accused falsely
    #: learns of it and refutes.
    gossip_to_the_dead: float = 30.0
    push_pull_interval: float = 30.0
    #: Deadline of a TCP exchange (push-pull, TCP ping, large message).
    stream_timeout: float = 10.0
    #: Attempt a reconnect to one failed member this often (heals partitions).
    reconnect_interval: float = 30.0
    #: Failed members are forgotten after this long (Serf's reconnect_timeout).
    reap_failed_after: float = 24 * 3600.0
    #: Departed (left) members are forgotten after this long (Serf's tombstone_timeout).
    reap_left_after: float = 24 * 3600.0
    #: Join: attempts per seed round and the first back-off (doubles each round).
    join_attempts: int = 3
    join_backoff: float = 1.0
    #: Graceful leave waits at most this long for the leave to be gossiped.
    leave_propagate: float = 1.0
    max_datagram: int = SAFE_DATAGRAM
    #: Metadata (tags) travels in every alive message, so it is capped.
    max_meta_bytes: int = 512
    #: Members one agent holds at most (a bound on memory and on the probe round that
    #: a flood of invented names could stretch); beyond it new names are refused.
    max_members: int = 1 << 16
    #: New member names one source host may introduce by datagram: a token bucket of
    #: ``new_member_burst`` refilled at ``new_member_rate`` per second. Joins go through
    #: push-pull over TCP, so this only slows names invented faster than any cluster
    #: grows (a plaintext cluster cannot tell invented names from real ones).
    new_member_rate: float = 64.0
    new_member_burst: int = 512

    # ---- derived values (memberlist's formulas) ---------------------------------

    def retransmit_limit(self, n: int) -> int:
        """Times each broadcast is sent: ``retransmit_mult * ceil(log10(n + 1))``."""
        return self.retransmit_mult * math.ceil(math.log10(n + 1))

    def suspicion_min(self, n: int) -> float:
        """``suspicion_mult * max(1, log10(n)) * probe_interval``."""
        return self.suspicion_mult * max(1.0, math.log10(max(n, 1))) * self.probe_interval

    def suspicion_max(self, n: int) -> float:
        return self.suspicion_max_mult * self.suspicion_min(n)

    def push_pull_period(self, n: int) -> float:
        """Scaled so each member's anti-entropy load stays flat past 32 members."""
        if n <= 32:
            return self.push_pull_interval
        return self.push_pull_interval * (math.ceil(math.log2(n) - math.log2(32)) + 1)

    def with_overrides(self, **changes: object) -> GossipConfig:
        return replace(self, **changes)  # type: ignore[arg-type]


#: memberlist's DefaultLANConfig.
LAN = GossipConfig()

#: memberlist's DefaultWANConfig: longer timeouts for high-latency links.
WAN = GossipConfig(
    probe_interval=5.0,
    probe_timeout=3.0,
    indirect_checks=3,
    suspicion_mult=6,
    gossip_interval=0.5,
    gossip_nodes=4,
    gossip_to_the_dead=60.0,
    push_pull_interval=60.0,
    stream_timeout=30.0,
)

#: Fast timers for loopback clusters (tests, demos). Not for real networks.
LOCAL = GossipConfig(
    probe_interval=0.2,
    probe_timeout=0.1,
    indirect_checks=2,
    suspicion_mult=3,
    suspicion_max_mult=4,
    retransmit_mult=3,
    gossip_interval=0.05,
    gossip_to_the_dead=5.0,
    push_pull_interval=5.0,
    stream_timeout=2.0,
    reconnect_interval=1.0,
    reap_failed_after=120.0,
    reap_left_after=120.0,
    join_backoff=0.2,
    leave_propagate=0.5,
)

PROFILES: dict[str, GossipConfig] = {"lan": LAN, "wan": WAN, "local": LOCAL}


def profile(name: str) -> GossipConfig:
    """The named profile; a clear ``ValueError`` for an unknown name."""
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(
            f"unknown profile {name!r}: expected one of {', '.join(sorted(PROFILES))}"
        ) from None
