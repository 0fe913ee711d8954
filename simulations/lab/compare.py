"""Lab against simulator: the figures of two reports side by side, with their ratio.

Both reports come from the same ``Recorder`` and the same report keys, so a figure is
one path into either. Each figure has the bar the issue holds it to; ``within`` says
whether the simulator's value is inside it. Pure.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Getter = Callable[[dict[str, Any]], float | None]


@dataclass(frozen=True, slots=True)
class Figure:
    label: str
    get: Getter
    #: Allowed |sim/lab - 1|; None: the two must be equal (counts such as false failures).
    bar: float | None = 0.10
    unit: str = "s"


def _path(*keys: str | int) -> Getter:
    def get(report: dict[str, Any]) -> float | None:
        v: Any = report.get("result", {})
        for k in keys:
            if isinstance(v, dict) and isinstance(k, str):
                v = v.get(k)
            elif isinstance(v, list) and isinstance(k, int) and -len(v) <= k < len(v):
                v = v[k]
            else:
                return None
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None
    return get


def _median_of_trials(key: str) -> Getter:
    def get(report: dict[str, Any]) -> float | None:
        xs = sorted(t[key] for t in report.get("result", {}).get("trials", ())
                    if t.get(key) is not None)
        if not xs:
            return None
        m = len(xs) // 2
        return float(xs[m] if len(xs) % 2 else (xs[m - 1] + xs[m]) / 2)
    return get


def _traffic(where: tuple[str | int, ...]) -> list[Figure]:
    return [Figure("packets per node per s", _path(*where, "packets_per_node_per_s"),
                   unit="/s"),
            Figure("UDP payload bytes per node per s",
                   _path(*where, "bytes_per_node_per_s"), unit="B/s"),
            Figure("TCP payload bytes per node per s",
                   _path(*where, "stream_bytes_per_node_per_s"), bar=0.25, unit="B/s")]


def _detection(key: str = "detection") -> list[Figure]:
    return [Figure("first suspicion, median", _path(key, "first_suspicion_s", "p50")),
            Figure("first failure, median", _path(key, "first_failure_s", "p50")),
            Figure("all live nodes list it failed, median",
                   _path(key, "all_know_100pct_s", "p50")),
            Figure("false failures of healthy nodes", _path("false_positives",
                                                            "failed_healthy"), bar=None,
                   unit="")]


FIGURES: dict[str, list[Figure]] = {
    "converge": [Figure("converged after", _path("converged_after_s"), bar=0.20),
                 Figure("a join reaches everyone, median",
                        _path("dissemination", "to_100pct_s", "p50"), bar=0.20),
                 *_traffic(("traffic",))],
    "crash": [*_detection(), *_traffic(("traffic",))],
    "detect": [Figure("first suspicion, median", _median_of_trials("first_suspect_s")),
               Figure("first failure, median", _median_of_trials("first_failed_s")),
               Figure("all live nodes list it failed, median",
                      _median_of_trials("all_failed_s")),
               Figure("false failures of healthy nodes",
                      _path("false_positives", "failed_healthy"), bar=None, unit="")],
    "loss": [Figure("false failures of healthy nodes",
                    _path("sweep", -1, "false_positives", "failed_healthy"), bar=None,
                    unit=""),
             Figure("false suspicions of healthy nodes",
                    _path("sweep", -1, "false_positives", "suspect_healthy"), bar=0.5,
                    unit=""),
             Figure("refutations", _path("sweep", -1, "refutations"), bar=0.5, unit=""),
             *_traffic(("sweep", -1, "traffic"))],
    "slow": [Figure(f"{what} ({lg})", _path(lg, "false_positives", key), bar=bar, unit="")
             for lg in ("lifeguard", "swim")
             for what, key, bar in (("false failures of healthy nodes", "failed_healthy",
                                     None),
                                    ("false failures of stopped nodes", "failed_slow", 0.5),
                                    ("false suspicions of healthy nodes", "suspect_healthy",
                                     0.5))],
    "partition": [Figure("merged after the heal", _path("merge_after_heal_s"), bar=0.20),
                  Figure("cross pairs failed at the heal", _path("cross_failed_at_heal"),
                         bar=0.05, unit=""),
                  *_traffic(("traffic",))],
    "churn": [*_detection(), Figure("a restart reaches everyone, median",
                                    _path("rejoin", "to_100pct_s", "p50"), bar=0.20),
              *_traffic(("traffic",))],
}


def rows(scenario: str, lab: dict[str, Any], sim: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for f in FIGURES[scenario]:
        a, b = f.get(lab), f.get(sim)
        if a is None:  # not measured in this lab run (slow runs one variant there)
            continue
        ratio = None if a is None or b is None or a == 0 else round(b / a, 3)
        if f.bar is None:
            within = a is not None and a == b
        else:
            within = ratio is not None and abs(ratio - 1.0) <= f.bar
        out.append({"figure": f.label, "unit": f.unit, "lab": a, "sim": b,
                    "sim_over_lab": ratio,
                    "bar": "equal" if f.bar is None else f"±{f.bar:.0%}",
                    "within": within})
    return out


def table(scenario: str, rows_: list[dict[str, Any]], header: str) -> str:
    def fmt(v: float | None) -> str:
        if v is None:
            return "–"
        return f"{v:,.3f}" if abs(v) < 100 else f"{v:,.0f}"
    lines = [header, "", "| figure | lab | sim | sim/lab | bar | ok |",
             "|---|---|---|---|---|---|"]
    for r in rows_:
        unit = f" {r['unit']}" if r["unit"] else ""
        lines.append(f"| {r['figure']} | {fmt(r['lab'])}{unit} | {fmt(r['sim'])}{unit} | "
                     f"{'–' if r['sim_over_lab'] is None else r['sim_over_lab']} | "
                     f"{r['bar']} | {'yes' if r['within'] else 'NO'} |")
    return "\n".join(lines)
