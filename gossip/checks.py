"""Health checks: what a check is and how its results become a status (sans-IO).

A check probes one local service (HTTP, TCP connect) or waits for the service to
heartbeat through the agent's API (TTL). Single results are noisy, so the status only
moves after ``rise`` consecutive passes or ``fall`` consecutive failures (HAProxy's
names; Consul calls them ``success_before_passing`` and ``failures_before_critical``);
``warn`` failures in a row, if set below ``fall``, first turn the check ``warning``.

The state machine here only counts and decides. The probing itself (sockets, timers)
is the sidecar's trio runner, ``proxy/check_runner.py``, and the status a check settles
on is what the catalog gossips: a change in status is a change in the service's record.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

PASSING = "passing"
WARNING = "warning"
CRITICAL = "critical"
STATUSES = (PASSING, WARNING, CRITICAL)
#: Order of badness, for aggregating several checks into one service status.
SEVERITY = {PASSING: 0, WARNING: 1, CRITICAL: 2}

KINDS = ("http", "tcp", "ttl")
#: Kept output per check (what the probe saw); enough for an error line.
MAX_OUTPUT = 256


@dataclass(frozen=True, slots=True)
class CheckSpec:
    """One check's definition. Times are in seconds.

    ``target`` is the URL for ``http`` (a 2xx answer passes, 429 warns, anything else
    fails) and ``host:port`` for ``tcp`` (a completed connect passes); ``ttl`` checks
    have no target and go critical when no heartbeat arrived within ``ttl``.
    """

    kind: str
    target: str = ""
    interval: float = 10.0
    timeout: float = 2.0
    ttl: float = 0.0
    rise: int = 1
    fall: int = 1
    #: Consecutive failures that make the check ``warning`` before it is critical
    #: (0: never; only meaningful below ``fall``).
    warn: int = 0
    #: Status before the first result; critical, as in Consul, so a service is not
    #: advertised before its check has passed once.
    initial: str = CRITICAL

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad field and what it should be."""
        if self.kind not in KINDS:
            raise ValueError(f"check kind {self.kind!r}: expected one of {', '.join(KINDS)}")
        if self.kind in ("http", "tcp") and not self.target:
            raise ValueError(f"{self.kind} check needs a target")
        if self.kind == "ttl" and not (0 < self.ttl <= 86400):
            raise ValueError(f"ttl {self.ttl!r}: expected a duration between 0 and 24h "
                             "for a ttl check")
        if self.kind != "ttl":
            if not (0.01 <= self.interval <= 86400):
                raise ValueError(f"interval {self.interval!r}: expected 10ms to 24h")
            if not (0.001 <= self.timeout <= self.interval + 1e-9):
                raise ValueError(f"timeout {self.timeout!r}: expected 1ms up to the "
                                 f"interval ({self.interval:g}s)")
        for name, value, low in (("rise", self.rise, 1), ("fall", self.fall, 1),
                                 ("warn", self.warn, 0)):
            if not (low <= value <= 100):
                raise ValueError(f"{name} {value!r}: expected an integer from {low} to 100")
        if self.initial not in STATUSES:
            raise ValueError(f"initial {self.initial!r}: expected one of "
                             f"{', '.join(STATUSES)}")

    def detection_time(self) -> float:
        """Worst time from a service breaking to this check saying critical."""
        if self.kind == "ttl":
            return self.ttl
        return self.fall * self.interval + self.timeout


class CheckState:
    """The live state of one check; every input returns whether the status changed."""

    def __init__(self, check_id: str, spec: CheckSpec, now: float) -> None:
        self.id = check_id
        self.spec = spec
        self.status = spec.initial
        self.output = ""
        self.successes = 0
        self.failures = 0
        self.changed_at = now
        self.last_result_at: float | None = None
        #: TTL checks only: when the current heartbeat runs out.
        self.expires = now + spec.ttl if spec.kind == "ttl" else math.inf

    def record(self, now: float, result: str, output: str = "") -> bool:
        """A probe finished with ``result`` (one of STATUSES)."""
        if result not in STATUSES:
            raise ValueError(f"unknown check result {result!r}")
        self.output = output[:MAX_OUTPUT]
        self.last_result_at = now
        s = self.spec
        if result == PASSING:
            self.failures = 0
            self.successes += 1
            return self._set(now, PASSING) if self.successes >= s.rise else False
        if result == WARNING:
            # The service itself says it is degraded (HTTP 429): believe it at once.
            self.successes = self.failures = 0
            return self._set(now, WARNING)
        self.successes = 0
        self.failures += 1
        if self.failures >= s.fall:
            return self._set(now, CRITICAL)
        if s.warn and self.failures >= s.warn and self.status == PASSING:
            return self._set(now, WARNING)
        return False

    def heartbeat(self, now: float, status: str = PASSING, output: str = "") -> bool:
        """A TTL heartbeat (pass, warn or fail through the API) sets the status
        directly and restarts the TTL."""
        if self.spec.kind != "ttl":
            raise ValueError(f"check {self.id!r} is a {self.spec.kind} check, not a ttl check")
        if status not in STATUSES:
            raise ValueError(f"unknown check status {status!r}")
        self.output = output[:MAX_OUTPUT]
        self.last_result_at = now
        self.expires = now + self.spec.ttl
        return self._set(now, status)

    def tick(self, now: float) -> bool:
        """Time passed: a TTL that ran out makes the check critical."""
        if now < self.expires:
            return False
        self.expires = math.inf  # until the next heartbeat
        self.output = f"TTL of {self.spec.ttl:g}s expired without a heartbeat"
        return self._set(now, CRITICAL)

    def next_deadline(self) -> float:
        return self.expires

    def _set(self, now: float, status: str) -> bool:
        if status == self.status:
            return False
        self.status = status
        self.changed_at = now
        return True


def aggregate(statuses: list[str]) -> str:
    """A service is as healthy as its worst check (passing with no checks)."""
    return max(statuses, key=SEVERITY.__getitem__, default=PASSING)
