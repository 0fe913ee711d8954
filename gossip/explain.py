"""``rumor explain MEMBER``: one timeline from every agent's history, and its story
(sans-IO).

The ``explain`` query gathers each agent's records about a member
(``history.MemberHistory.about``, sent with ``history.to_wire`` in wall-clock time).
Here the answers are put on the asker's clock (``estimate_offset``: NTP's four
timestamps, from the query's round trip), merged into one sorted timeline
(``merge_timeline``), and read as a story (``story``): who suspected the member first
and after which missed probes, who confirmed independently and when, whether and when
it refuted, who declared it failed, and every agent's local-health score at those
moments. ``format_story`` prints it for a terminal. The simulator feeds the same
functions its nodes' histories with offset 0 (``rumor sim ... --explain MEMBER``).

A story is told per suspicion, keyed by the incarnation it accused: a member suspected,
refuted and suspected again has two episodes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .history import (
    DEAD_HEARD,
    DECLARED_DEAD,
    HEALTH,
    LEFT_HEARD,
    PROBE_DIRECT_FAILED,
    PROBE_INDIRECT_FAILED,
    REFUTE_SEEN,
    REFUTED,
    SUSPECT_CONFIRMED,
    SUSPECT_HEARD,
    SUSPECT_RAISED,
    HistoryDecodeError,
    Record,
    read_wire,
    to_wire,
)

if TYPE_CHECKING:
    from .query import Pending  # query.py imports this module

_PROBES = (PROBE_DIRECT_FAILED, PROBE_INDIRECT_FAILED)
_SUSPICIONS = (SUSPECT_RAISED, SUSPECT_HEARD, SUSPECT_CONFIRMED)
#: Entries kept in a long timeline: the agents' own probes, accusations, refutations.
_DECISIVE = (PROBE_DIRECT_FAILED, PROBE_INDIRECT_FAILED, SUSPECT_RAISED, REFUTED)


def _decisive(e: Entry) -> bool:
    r = e.record
    return r.kind in _DECISIVE or (r.kind == SUSPECT_CONFIRMED and r.by == e.agent)


def estimate_offset(sent_wall: float, received_wall_remote: float,
                    answered_wall_remote: float, arrived_wall: float) -> tuple[float, float]:
    """The remote clock minus ours, and the bound of that estimate: NTP's four
    timestamps (we sent at ``sent_wall``, it received and answered at its
    ``received_wall_remote`` and ``answered_wall_remote``, the answer arrived at our
    ``arrived_wall``). The bound is half the round trip less the remote's holding time.
    ``query.Pending.offset`` applies it to a pending query's answer."""
    offset = ((received_wall_remote - sent_wall) + (answered_wall_remote - arrived_wall)) / 2
    rtt = (arrived_wall - sent_wall) - (answered_wall_remote - received_wall_remote)
    return offset, max(0.0, rtt) / 2


@dataclass(frozen=True, slots=True)
class Entry:
    """One record of one agent, at a time on the asker's clock."""

    at: float
    agent: str
    record: Record

    @property
    def kind(self) -> str:
        return self.record.kind


def merge_timeline(answers: Iterable[tuple[str, float, Iterable[Record]]]) -> list[Entry]:
    """One timeline from ``(agent, offset, records)`` answers: each agent's times less
    its ``offset`` (its clock minus ours), sorted by time; an agent's own records keep
    their order when they share a time (a failed probe before the suspicion it raised)."""
    keyed: list[tuple[float, str, int, Entry]] = []
    for agent, offset, records in answers:
        if not math.isfinite(offset):
            offset = 0.0
        for i, r in enumerate(records):
            at = r.at - offset
            keyed.append((at, agent, i, Entry(at, agent, r)))
    keyed.sort(key=lambda k: (k[0], k[1], k[2]))
    return [k[3] for k in keyed]


@dataclass(slots=True)
class Accuser:
    """An agent in a suspicion: its time (its own record's, or when another first
    counted its word), its local-health score then (None: it did not answer)."""

    agent: str
    at: float
    health: int | None
    #: The time comes from the agent's own history (not from hearsay).
    own: bool
    #: How its accusation arose (``probe``, ``push-pull``, ``dead``; None: hearsay).
    via: str | None = None


@dataclass(slots=True)
class Episode:
    """One suspicion of the member, at the incarnation it accused."""

    incarnation: int
    first_suspecter: str | None = None
    suspected_at: float | None = None
    suspecter_health: int | None = None
    #: The first suspecter's failed probes that led to it (direct, then indirect).
    missed_probes: list[Entry] = field(default_factory=list)
    #: Independent confirmations: other accusers, earliest first.
    confirmers: list[Accuser] = field(default_factory=list)
    #: Agents that recorded the suspicion (raised, heard or counted).
    heard_by: set[str] = field(default_factory=set)
    refuted_at: float | None = None
    refuted_incarnation: int | None = None
    #: The member's own record of refuting (else: when others saw it alive again).
    refuted_own: bool = False
    refuted_accuser: str | None = None
    refute_seen_by: set[str] = field(default_factory=set)
    #: Agents whose suspicion ran out (they declared it failed), earliest first.
    declared: list[Accuser] = field(default_factory=list)
    #: Agents that hold it failed (declared, or heard).
    failed_known_by: set[str] = field(default_factory=set)
    left_at: float | None = None

    @property
    def start(self) -> float:
        times = [t for t in (self.suspected_at,) if t is not None]
        times += [d.at for d in self.declared]
        return min(times) if times else math.inf


@dataclass(slots=True)
class Story:
    """What the timeline says about ``member``."""

    member: str
    agents: list[str]
    entries: int
    episodes: list[Episode]

    @property
    def first(self) -> Episode | None:
        return self.episodes[0] if self.episodes else None

    @property
    def first_suspecter(self) -> str | None:
        return self.first.first_suspecter if self.first else None

    @property
    def confirmers(self) -> list[str]:
        return [c.agent for c in self.first.confirmers] if self.first else []

    @property
    def declared_by(self) -> list[str]:
        return [d.agent for d in self.first.declared] if self.first else []


def story(timeline: Sequence[Entry], member: str) -> Story:
    """Read ``timeline`` (from ``merge_timeline``) as the story of ``member``."""
    about = [e for e in timeline if e.record.member == member and e.kind != HEALTH]
    episodes: dict[int, Episode] = {}

    def episode(inc: int) -> Episode:
        ep = episodes.get(inc)
        if ep is None:
            ep = episodes[inc] = Episode(inc)
        return ep

    # Accusations: per incarnation, per accuser, its earliest time (own record first).
    accusers: dict[int, dict[str, Accuser]] = {}
    health_at: dict[tuple[int, str], int] = {}
    for e in about:
        r = e.record
        inc = r.get("incarnation")
        if r.kind in _SUSPICIONS and isinstance(inc, int):
            ep = episode(inc)
            ep.heard_by.add(e.agent)
            own = r.kind == SUSPECT_RAISED or (r.kind == SUSPECT_CONFIRMED
                                               and r.by == e.agent)
            acc = accusers.setdefault(inc, {})
            known = acc.get(r.by)
            if own:
                health_at[(inc, r.by)] = r.health
                if known is None or not known.own or e.at < known.at:
                    via = r.get("via")
                    acc[r.by] = Accuser(r.by, e.at, r.health, True,
                                        via if isinstance(via, str) else None)
            elif known is None or (not known.own and e.at < known.at):
                acc[r.by] = Accuser(r.by, e.at, None, False)
        elif r.kind == DECLARED_DEAD and isinstance(inc, int):
            ep = episode(inc)
            ep.declared.append(Accuser(e.agent, e.at, r.health, True))
            ep.failed_known_by.add(e.agent)
        elif r.kind == DEAD_HEARD and isinstance(inc, int):
            ep = episode(inc)
            ep.failed_known_by.add(e.agent)
            if r.by not in {d.agent for d in ep.declared}:
                ep.declared.append(Accuser(r.by, e.at, None, False))
        elif r.kind == LEFT_HEARD and isinstance(inc, int):
            ep = episode(inc)
            if ep.left_at is None or e.at < ep.left_at:
                ep.left_at = e.at
    # A declarer known only by hearsay, whose own record arrived too: keep the own one.
    for ep in episodes.values():
        mine = {d.agent for d in ep.declared if d.own}
        ep.declared = sorted((d for d in ep.declared if d.own or d.agent not in mine),
                             key=lambda d: d.at)
        for d in ep.declared:
            if d.health is None:
                d.health = health_at.get((ep.incarnation, d.agent))
    for inc, acc in accusers.items():
        ep = episode(inc)
        ranked = sorted(acc.values(), key=lambda a: (a.at, not a.own, a.agent))
        first = ranked[0]
        ep.first_suspecter, ep.suspected_at = first.agent, first.at
        ep.suspecter_health = first.health
        ep.confirmers = ranked[1:]
        ep.missed_probes = _missed_probes(about, first.agent, inc)
    # Refutations: the earliest new incarnation above each episode's.
    refutes = [e for e in about if e.kind in (REFUTED, REFUTE_SEEN)]
    for ep in episodes.values():
        for e in refutes:
            new = e.record.get("incarnation")
            if not isinstance(new, int) or new <= ep.incarnation:
                continue
            if e.kind == REFUTED and e.agent == member:
                if not ep.refuted_own or (ep.refuted_at is not None and e.at < ep.refuted_at):
                    ep.refuted_at, ep.refuted_incarnation = e.at, new
                    ep.refuted_own = True
                    acc_by = e.record.get("accuser")
                    ep.refuted_accuser = acc_by if isinstance(acc_by, str) and acc_by else None
            elif e.kind == REFUTE_SEEN and e.record.get("was") == "suspect" \
                    and ep.refuted_incarnation in (None, new):
                ep.refute_seen_by.add(e.agent)
                if not ep.refuted_own and (ep.refuted_at is None or e.at < ep.refuted_at):
                    ep.refuted_at, ep.refuted_incarnation = e.at, new
    agents = sorted({e.agent for e in timeline})
    ordered = sorted(episodes.values(), key=lambda ep: (ep.start, ep.incarnation))
    return Story(member, agents, len(about), ordered)


def _missed_probes(about: Sequence[Entry], agent: str, inc: int) -> list[Entry]:
    """``agent``'s failed probes of the member just before it raised the suspicion at
    ``inc``: those since its previous record of another kind."""
    missed: list[Entry] = []
    for e in about:
        if e.agent != agent:
            continue
        if e.kind in _PROBES:
            missed.append(e)
            continue
        if e.kind == SUSPECT_RAISED and e.record.get("incarnation") == inc:
            return missed
        missed = []
    return []


def story_json(s: Story) -> dict[str, Any]:
    """The story as JSON (times on the asker's clock, as in the timeline)."""

    def acc(a: Accuser) -> dict[str, Any]:
        return {"agent": a.agent, "at": a.at, "health": a.health, "own": a.own,
                "via": a.via}

    return {"member": s.member, "agents": s.agents, "entries": s.entries,
            "first_suspecter": s.first_suspecter, "confirmers": s.confirmers,
            "declared_by": s.declared_by,
            "episodes": [{
                "incarnation": ep.incarnation, "first_suspecter": ep.first_suspecter,
                "suspected_at": ep.suspected_at, "suspecter_health": ep.suspecter_health,
                "missed_probes": [{"agent": e.agent, "at": e.at, "kind": e.kind}
                                  for e in ep.missed_probes],
                "confirmers": [acc(c) for c in ep.confirmers],
                "heard_by": sorted(ep.heard_by),
                "refuted_at": ep.refuted_at, "refuted_incarnation": ep.refuted_incarnation,
                "refuted_own": ep.refuted_own, "refuted_accuser": ep.refuted_accuser,
                "refute_seen_by": sorted(ep.refute_seen_by),
                "declared": [acc(d) for d in ep.declared],
                "failed_known_by": sorted(ep.failed_known_by), "left_at": ep.left_at,
            } for ep in s.episodes]}


def explain_summary(p: Pending, member: str, since_wall: float) -> dict[str, Any]:
    """A finished ``explain`` query as the API's JSON: each answer decoded as untrusted
    input (a bad one is reported under "errors", never merged)."""
    agents: dict[str, Any] = {}
    errors: dict[str, str] = {}
    merged: list[tuple[str, float, list[Record]]] = []
    for agent, a in sorted(p.answers.items()):
        if not a.ok:
            errors[agent] = a.error or "failed"
            continue
        try:
            records, evicted = read_wire(a.data)
        except HistoryDecodeError as e:
            errors[agent] = f"bad history: {e}"
            continue
        off = p.offset(agent) or (0.0, math.inf)
        agents[agent] = {"offset_ms": round(off[0] * 1000, 3),
                         "bound_ms": round(off[1] * 1000, 3) if math.isfinite(off[1]) else None,
                         "evicted": evicted, "history": to_wire(records)}
        merged.append((agent, off[0], records))
    return {"member": member, "since": since_wall, "agents": agents, "errors": errors,
            "missing": p.missing, "expected": len(p.expected),
            "story": story_json(story(merge_timeline(merged), member))}



# ---- the terminal -----------------------------------------------------------------------------


def _rel(t: float, t0: float) -> str:
    return f"+{t - t0:.3f}s" if t >= t0 else f"-{t0 - t:.3f}s"


def _health(h: int | None) -> str:
    return "health ?" if h is None else f"health {h}"


def _probe_text(e: Entry, t0: float) -> str:
    r = e.record
    helpers = r.get("helpers") or ()
    if r.kind == PROBE_DIRECT_FAILED:
        return f"no ack at {_rel(e.at, t0)} (after {r.get('after', 0.0):.3f}s)"
    via = f" via {','.join(helpers)}" if helpers else ""
    nacks = f", {r.get('nacks', 0)}/{r.get('expected_nacks', 0)} nacks" \
        if r.get("expected_nacks") else ""
    return f"none indirectly{via} by {_rel(e.at, t0)}{nacks}"


def format_story(s: Story, timeline: Sequence[Entry], *, max_lines: int | None = 80,
                 clock: Callable[[float], str] | None = None) -> str:
    """The story and its timeline for a terminal: a summary per suspicion, then the
    entries with times relative to the first (``clock`` renders that first time, e.g.
    as a date; default: the number). A timeline longer than ``max_lines`` keeps every
    decisive entry (probes, accusations, own confirmations, refutations) and the first
    few of every other kind (news many agents merely heard), counting what it elides."""
    entries = [e for e in timeline if e.record.member == s.member or e.kind == HEALTH]
    if not entries:
        return f"explain {s.member}: no agent recorded anything about it"
    t0 = entries[0].at
    out = [f"explain {s.member}: {len(s.agents)} agent(s), {s.entries} record(s) about it, "
           f"from {clock(t0) if clock else f'{t0:.3f}'} (+0.000s)"]
    if not s.episodes:
        out.append("  never suspected in this window")
    for ep in s.episodes:
        out.append(f"suspicion of incarnation {ep.incarnation}:")
        if ep.first_suspecter is not None and ep.suspected_at is not None:
            line = (f"  first suspected by {ep.first_suspecter} at "
                    f"{_rel(ep.suspected_at, t0)} ({_health(ep.suspecter_health)})")
            if ep.missed_probes:
                line += " after its probe got " + "; then ".join(
                    _probe_text(e, t0) for e in ep.missed_probes)
            out.append(line)
            if ep.confirmers:
                out.append("  confirmed by " + ", ".join(
                    f"{c.agent} at {_rel(c.at, t0)} ({_health(c.health)}"
                    + ("" if c.own else ", heard")
                    + (f", via {c.via}" if c.via and c.via != "probe" else "") + ")"
                    for c in ep.confirmers))
            else:
                out.append("  no independent confirmation")
            out.append(f"  {len(ep.heard_by)} agent(s) recorded the suspicion")
        if ep.refuted_at is not None:
            how = "refuted" if ep.refuted_own else "seen refuting"
            line = (f"  {how} at {_rel(ep.refuted_at, t0)} with incarnation "
                    f"{ep.refuted_incarnation}")
            if ep.refuted_accuser:
                line += f" (told by {ep.refuted_accuser})"
            if ep.refute_seen_by:
                line += f"; {len(ep.refute_seen_by)} agent(s) saw it alive again"
            out.append(line)
        elif ep.declared:
            out.append("  not refuted")
        if ep.declared:
            d0 = ep.declared[0]
            rest = ep.declared[1:]
            line = (f"  declared failed by {d0.agent} at {_rel(d0.at, t0)} "
                    f"({_health(d0.health)})")
            if rest:
                line += f", then by {len(rest)} other(s): " + ", ".join(
                    d.agent for d in rest[:8]) + (" ..." if len(rest) > 8 else "")
            out.append(line)
            out.append(f"  {len(ep.failed_known_by)} agent(s) hold it failed")
        if ep.left_at is not None:
            out.append(f"  left at {_rel(ep.left_at, t0)}")
    out.append("timeline:")
    shown: list[Entry | str] = list(entries)
    if max_lines is not None and len(entries) > max_lines:
        keep = max(0, max_lines - sum(1 for e in entries if _decisive(e)))
        others = {e.kind for e in entries if not _decisive(e)}
        seen: dict[str, int] = {}
        elided: dict[str, int] = {}
        shown = []
        for e in entries:
            if not _decisive(e):
                n = seen[e.kind] = seen.get(e.kind, 0) + 1
                if n > max(1, keep // max(1, len(others))):
                    elided[e.kind] = elided.get(e.kind, 0) + 1
                    continue
            shown.append(e)
        shown += [f"... {n} more {kind} entries" for kind, n in elided.items()]
    agent_w = max((len(e.agent) for e in entries), default=5)
    kind_w = max(len(e.kind) for e in entries)
    rel_w = max(len(_rel(e.at, t0)) for e in entries)
    for item in shown:
        if isinstance(item, str):
            out.append(f"  {item}")
            continue
        r = item.record
        out.append(f"  {_rel(item.at, t0):>{rel_w}}  {item.agent:<{agent_w}}  "
                   f"{r.kind:<{kind_w}}  "
                   f"{r.describe()}  [{_health(r.health)}]")
    return "\n".join(out)


__all__ = [
    "Accuser",
    "Entry",
    "Episode",
    "Story",
    "estimate_offset",
    "explain_summary",
    "format_story",
    "merge_timeline",
    "story",
    "story_json",
]
