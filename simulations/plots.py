"""PNG plots of a report. matplotlib is an optional extra: without it nothing is drawn
and the caller says so; the JSON report never depends on it."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any


def available() -> bool:
    try:
        importlib.import_module("matplotlib")
    except ImportError:
        return False
    return True


def write_plots(report: dict[str, Any], directory: Path) -> list[Path]:
    """Draw what the report has data for; returns the files written."""
    # Imported by name so the type checker does not need the optional extra.
    importlib.import_module("matplotlib").use("Agg")  # files only, never a window
    plt: Any = importlib.import_module("matplotlib.pyplot")

    directory.mkdir(parents=True, exist_ok=True)
    res = report["result"]
    name = report["scenario"]
    written: list[Path] = []

    def save(fig: Any, stem: str) -> None:
        path = directory / f"{name}-{stem}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    curves = res.get("curves", {})
    failure = curves.get("failure", {})
    if failure:
        fig, ax = plt.subplots(figsize=(6, 4))
        for member, pts in failure.items():
            if pts:
                ax.step([p[0] for p in pts], [p[1] for p in pts], where="post", label=member)
        bound = report["analytic"]["detection_bound_s"]
        ax.axvline(bound, color="grey", linestyle=":", label="bound")
        ax.set_xlabel("seconds after the crash")
        ax.set_ylabel("fraction of live nodes that list it failed")
        ax.set_title("failure detection CDF")
        ax.legend(fontsize="small")
        save(fig, "detection-cdf")
    joins = curves.get("join", {})
    if joins:
        fig, ax = plt.subplots(figsize=(6, 4))
        for member, pts in joins.items():
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], label=member)
        ax.set_xlabel("seconds after the join")
        ax.set_ylabel("fraction of nodes that know the member")
        ax.set_title("infection curve (join dissemination)")
        ax.legend(fontsize="small")
        save(fig, "infection")
    sweep = res.get("sweep")
    if sweep:
        fig, ax = plt.subplots(figsize=(6, 4))
        xs = [r["loss"] for r in sweep]
        ax.plot(xs, [r["false_positives"]["failed_healthy"] for r in sweep], "o-",
                label="false failures")
        ax.plot(xs, [r["false_positives"]["suspect_healthy"] for r in sweep], "s--",
                label="false suspicions")
        ax.set_xlabel("datagram loss rate")
        ax.set_ylabel("events (all observers)")
        ax.set_yscale("symlog")
        ax.set_title("false positives vs loss")
        ax.legend()
        save(fig, "false-positives")
    if "lifeguard" in res and "swim" in res:
        fig, ax = plt.subplots(figsize=(6, 4))
        keys = ["failed_healthy", "failed_slow", "suspect_healthy", "suspect_slow"]
        xs = list(range(len(keys)))
        ax.bar([x - 0.2 for x in xs], [res["swim"]["false_positives"][k] for k in keys],
               0.4, label="SWIM")
        ax.bar([x + 0.2 for x in xs], [res["lifeguard"]["false_positives"][k] for k in keys],
               0.4, label="Lifeguard")
        ax.set_xticks(xs, keys, fontsize="small")
        ax.set_yscale("symlog")
        ax.set_title("false positives with slow nodes")
        ax.legend()
        save(fig, "slow")
    return written
