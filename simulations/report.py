# layer: shell — stamps reports with the wall-clock time (time)
"""Human output of a simulation: a progress bar and a summary table."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO


class ProgressBar:
    """One self-overwriting line on ``stream``: virtual time done, events/s, ETA.
    Redrawn at most ten times a second, so it costs nothing measurable."""

    def __init__(self, label: str, stream: TextIO = sys.stderr, width: int = 30) -> None:
        self.label = label
        self.stream = stream
        self.width = width
        self.t0 = time.perf_counter()
        self._last = 0.0
        self._shown = False

    def __call__(self, now: float, end: float) -> None:
        wall = time.perf_counter()
        if wall - self._last < 0.1:
            return
        self._last = wall
        frac = 0.0 if end <= 0 else min(max(now / end, 0.0), 1.0)
        filled = int(frac * self.width)
        bar = "#" * filled + "-" * (self.width - filled)
        spent = wall - self.t0
        self.stream.write(f"\r{self.label} [{bar}] t={now:8.1f}s of {end:.0f}s  "
                          f"wall {spent:6.1f}s")
        self.stream.flush()
        self._shown = True

    def close(self) -> None:
        if self._shown:
            self.stream.write("\n")
            self.stream.flush()


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def _dist_row(name: str, d: dict[str, Any]) -> list[str]:
    return [name] + [_fmt(d.get(k)) for k in ("count", "min", "mean", "p50", "p99", "max")]


def _table(rows: list[list[str]], head: list[str]) -> str:
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
             for r in [head, *rows]]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def summary(report: dict[str, Any]) -> str:
    """A readable digest of a report (every figure is in the JSON too)."""
    if report["scenario"] == "traffic":
        from .traffic import summary as traffic_summary
        return traffic_summary(report)
    res = report["result"]
    p = report["params"]
    where = "lab" if report.get("kind") == "lab" else "sim"
    out = [f"rumor {where} {report['scenario']}: {p['nodes']} nodes, seed {p['seed']}, "
           f"profile {p['profile']}, lifeguard {'on' if report['config']['lifeguard'] else 'off'}"
           + (f", loss sweep {p['sweep']}" if report["scenario"] == "loss"
              else f", loss {p['loss']}")]
    dists: list[list[str]] = []
    det = res.get("detection")
    if det:
        for key, label in (("first_suspicion_s", "first suspicion (s)"),
                           ("first_failure_s", "first failure (s)"),
                           ("all_know_50pct_s", "50% know failed (s)"),
                           ("all_know_99pct_s", "99% know failed (s)"),
                           ("all_know_100pct_s", "100% know failed (s)")):
            dists.append(_dist_row(label, det[key]))
    for key in ("dissemination", "rejoin"):
        dis = res.get(key)
        if dis:
            for pct in ("50", "99", "100"):
                dists.append(_dist_row(f"{key} to {pct}% (s)", dis[f"to_{pct}pct_s"]))
    for key, label in (("hold_time_s", "time to hold the document (s)"),
                       ("copies_received_per_node", "copies received per node")):
        if key in res:
            dists.append(_dist_row(label, res[key]))
    if dists:
        out.append(_table(dists, ["figure", "n", "min", "mean", "p50", "p99", "max"]))
    facts: list[list[str]] = []
    for k, v in res.items():
        if isinstance(v, (int, float, str, bool)) or v is None:
            facts.append([k, _fmt(v)])
    fp = res.get("false_positives")
    if fp:
        facts += [[f"false {k}", _fmt(v)] for k, v in fp.items() if k != "examples"]
    tr = res.get("traffic")
    if tr:
        facts += [[k, _fmt(v)] for k, v in tr.items()]
    for label in ("lifeguard", "swim"):
        row = res.get(label)
        if row:
            fpr = row["false_positives"]
            facts.append([f"{label}: false failed healthy / slow",
                          f"{fpr['failed_healthy']} / {fpr['failed_slow']}"])
            facts.append([f"{label}: false suspicions healthy / slow",
                          f"{fpr['suspect_healthy']} / {fpr['suspect_slow']}"])
    if "sweep" in res:
        sweep = [[_fmt(r["loss"]), _fmt(r["false_positives"]["failed_healthy"]),
                  _fmt(r["false_positives"]["suspect_healthy"]),
                  _fmt(r["false_positives"]["failed_healthy_per_node_hour"]),
                  _fmt(r["traffic"].get("packets_per_node_per_s"))] for r in res["sweep"]]
        out.append(_table(sweep, ["loss", "false failed", "false suspect",
                                  "per node-hour", "pkts/node/s"]))
    if facts:
        out.append(_table(facts, ["figure", "value"]))
    an = report["analytic"]
    out.append("analytic: " + ", ".join(f"{k}={_fmt(v)}" for k, v in an.items()))
    w = report["wall"]
    if where == "lab":
        lab = report["lab"]
        out.append(f"lab {lab['lab']}: {lab['hosts']} agents in namespaces (IPv"
                   f"{lab['family']}), {lab['member_events']} member events in "
                   f"{w['seconds']:.1f} wall s")
        return "\n\n".join(out)
    out.append(f"simulator: {report['sim']['events']} events over "
               f"{report['sim']['virtual_s']:.1f} virtual s in {w['seconds']:.1f} wall s "
               f"({w['events_per_s']} events/s)")
    return "\n\n".join(out)
