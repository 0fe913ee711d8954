"""Gossip settings and the three profiles (``lan``, ``wan``, ``local``).

The timing formulas are memberlist's, so operators who know Serf or Consul can read
rumor's behaviour off the same numbers:

* probe timeout is scaled by the local-health (awareness) multiplier:
  ``probe_timeout * (awareness + 1)``;
* suspicion timeout minimum: ``suspicion_mult * max(1, log10(n)) * probe_interval``;
  maximum: ``suspicion_max_mult * minimum``; with C independent confirmations the
  timeout is ``max(min, max - (max - min) * log(C + 1) / log(K + 1))`` where K is
  ``suspicion_confirmations`` (3, as in the Lifeguard paper; memberlist uses 2);
* every membership broadcast is sent ``retransmit_mult * ceil(log10(n + 1))`` times,
  every application broadcast (catalog, policy, keyring) ``user_retransmit_mult *
  ceil(log10(n + 1))`` times (twice as many by default: see ``user_retransmit_mult``);
* two members whose application-state summaries differ after both have been stable
  for ``gossip_interval * (ceil(log10(n + 1)) + 1)`` (the epidemic's reach) repair by
  a push-pull at once (``state_repair``, see ``anti_entropy.py``);
* push-pull runs every ``push_pull_interval`` up to 32 members and every
  ``push_pull_interval * (ceil(log2(n) - log2(32)) + 1)`` beyond, so anti-entropy
  traffic per member stays flat as the cluster grows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

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
    #: Application broadcasts are sent ``user_retransmit_mult * ceil(log10(n + 1))``
    #: times. With memberlist's 4, 30 members send a registration about 230 times in
    #: all and in about 1.5% of registrations one member is sent no copy at all (the
    #: targets are random; measured in ``rumor sim catalog``); 8 makes that about
    #: e^-8 times rarer, at the cost of bytes only while something changes.
    user_retransmit_mult: int = 8
    gossip_interval: float = 0.2
    gossip_nodes: int = 3
    #: An application broadcast starts a gossip round at once (at most one early round
    #: per quarter interval) instead of waiting for the next one.
    gossip_on_news: bool = True
    #: Keep gossiping to a failed or left member this long, so that one accused falsely
    #: learns of it and refutes.
    gossip_to_the_dead: float = 30.0
    push_pull_interval: float = 30.0
    #: Every datagram carries a 32-bit summary of the sender's application state and
    #: how long it has been unchanged; two members whose summaries differ once both
    #: have been stable for ``repair_after(n)`` push-pull at once instead of waiting
    #: for the periodic exchange (anti-entropy on demand).
    state_repair: bool = True
    #: A member starts at most one such repair per this many seconds.
    repair_interval: float = 1.0
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
    #: Once one seed answered, the join waits at most this long for the others
    #: (their answers merge whenever they come), so a dead seed does not delay it by
    #: a whole ``stream_timeout``.
    join_grace: float = 1.0
    #: Graceful leave waits at most this long for the leave to be gossiped.
    leave_propagate: float = 1.0
    #: A leaving member also tells this many live members directly (all of them in a
    #: small cluster): when several leave at once (a host shutting down its agents,
    #: a rolling restart) the others are not there to relay, and a member the
    #: epidemic missed would suspect and then fail the leaver instead of seeing it go.
    leave_fanout: int = 32
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
    #: On a plaintext cluster a name learned from third-party gossip is admitted only
    #: once it answered a direct ping at its claimed address (``admission.py``); at
    #: most ``max_pending`` names wait, each for ``admission_timeout``, and the pings
    #: are limited to ``admission_rate`` per second (bursts of ``admission_burst``).
    admit_by_ping: bool = True
    max_pending: int = 4096
    admission_timeout: float = 2.5
    admission_rate: float = 128.0
    admission_burst: int = 512

    # ---- derived values (memberlist's formulas) ---------------------------------

    def retransmit_limit(self, n: int) -> int:
        """Times each broadcast is sent: ``retransmit_mult * ceil(log10(n + 1))``."""
        return self.retransmit_mult * math.ceil(math.log10(n + 1))

    def user_retransmit_limit(self, n: int) -> int:
        """Times each application broadcast is sent."""
        return self.user_retransmit_mult * math.ceil(math.log10(n + 1))

    def repair_after(self, n: int) -> float:
        """How long both summaries must have been stable before a difference counts:
        about the rounds an epidemic needs to reach everyone, plus one."""
        return self.gossip_interval * (math.ceil(math.log10(n + 1)) + 1)

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

    def tuned(self, settings: list[str]) -> GossipConfig:
        """This config with ``name=value`` settings applied (``rumor agent --tune``);
        ``ValueError`` names the first unknown setting or bad value. Every value is
        checked against ``LIMITS`` and the result against ``problems()``, so what the
        agent runs with is always a config its timers and formulas can work with."""
        changes: dict[str, object] = {}
        kinds = {f.name: type(getattr(self, f.name)) for f in fields(self)}
        for text in settings:
            name, sep, raw = text.partition("=")
            name = name.strip().replace("-", "_")
            if not sep or name not in kinds:
                raise ValueError(f"--tune {text!r}: expected NAME=VALUE with NAME one of "
                                 f"{', '.join(sorted(kinds))}")
            kind, raw = kinds[name], raw.strip()
            try:
                if kind is bool:
                    if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
                        raise ValueError(raw)
                    value: object = raw.lower() in ("true", "1", "yes")
                else:
                    value = kind(raw)
            except ValueError:
                expected = {bool: "true or false", int: "an integer",
                            float: "a number"}.get(kind, kind.__name__)
                raise ValueError(f"--tune {text!r}: {name} must be {expected}, "
                                 f"found {raw[:40]!r}") from None
            problem = check_value(name, value)
            if problem:
                raise ValueError(f"--tune {text!r}: {problem}")
            changes[name] = value
        cfg = replace(self, **changes)  # type: ignore[arg-type]
        problems = cfg.problems()
        if problems:
            raise ValueError(f"--tune {' '.join(settings)!r}: {problems[0]}")
        return cfg

    def problems(self) -> list[str]:
        """What makes this config unusable, in words naming the tunables (empty when
        it is sound): each value within ``LIMITS``, then the relations between them."""
        out = [p for f in fields(self) if (p := check_value(f.name, getattr(self, f.name)))]
        if out:
            return out
        if self.probe_timeout >= self.probe_interval:
            out.append(f"probe_timeout ({self.probe_timeout:g} s) must be shorter than "
                       f"probe_interval ({self.probe_interval:g} s): a probe's direct "
                       "wait ends within its protocol period")
        if self.max_meta_bytes >= self.max_datagram:
            out.append(f"max_meta_bytes ({self.max_meta_bytes}) must be smaller than "
                       f"max_datagram ({self.max_datagram}): tags travel in datagrams")
        return out


#: Range of every numeric tunable: (lowest, highest), both allowed. Booleans take
#: any bool. Intervals that drive a loop have a floor well above 0 (``probe_interval=0``
#: spun a core and declared healthy peers failed); counts the formulas divide by or
#: multiply with start at 1.
LIMITS: dict[str, tuple[float, float]] = {
    "probe_interval": (0.01, 3600.0),
    "probe_timeout": (0.001, 3600.0),
    "indirect_checks": (0, 64),
    "awareness_max_multiplier": (1, 64),
    "suspicion_mult": (1, 1000),
    "suspicion_max_mult": (1, 1000),
    "suspicion_confirmations": (1, 64),
    "retransmit_mult": (1, 100),
    "user_retransmit_mult": (1, 100),
    "gossip_interval": (0.01, 3600.0),
    "gossip_nodes": (1, 64),
    "gossip_to_the_dead": (0.0, 7 * 86400.0),
    "push_pull_interval": (0.1, 86400.0),
    "repair_interval": (0.01, 3600.0),
    "stream_timeout": (0.01, 3600.0),
    "reconnect_interval": (0.01, 86400.0),
    "reap_failed_after": (1.0, 365 * 86400.0),
    "reap_left_after": (1.0, 365 * 86400.0),
    "join_attempts": (1, 1000),
    "join_backoff": (0.0, 3600.0),
    "join_grace": (0.0, 3600.0),
    "leave_propagate": (0.0, 3600.0),
    "leave_fanout": (0, 1 << 16),
    "max_datagram": (576, 65_507),
    "max_meta_bytes": (0, 65_507),
    "max_members": (1, 1 << 24),
    "new_member_rate": (0.0, 1e6),
    "new_member_burst": (0, 1 << 24),
    "max_pending": (0, 1 << 16),
    "admission_timeout": (0.01, 3600.0),
    "admission_rate": (0.0, 1e6),
    "admission_burst": (0, 1 << 24),
}


def check_value(name: str, value: object) -> str:
    """Why ``value`` is no good for the tunable ``name`` ("" when it is): the right
    type (an int where a count is wanted, never a bool for a number), finite, and
    within ``LIMITS``."""
    default = getattr(LAN, name)
    if isinstance(default, bool):
        return "" if isinstance(value, bool) else f"{name} must be true or false"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"{name} must be a number, found {type(value).__name__}"
    if isinstance(default, int) and not isinstance(value, int):
        return f"{name} must be an integer, found {value!r}"
    if not math.isfinite(value):
        return f"{name} must be a finite number, found {value!r}"
    low, high = LIMITS[name]
    unit = " s" if isinstance(default, float) else ""
    if not low <= value <= high:
        return f"{name} must be from {low:g}{unit} to {high:g}{unit}, found {value!r}"
    return ""


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
    user_retransmit_mult=6,
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
