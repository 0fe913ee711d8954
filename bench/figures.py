"""How the benches summarize latencies: one distribution shape for every report."""

from __future__ import annotations

from typing import Any


def distribution(xs: list[float]) -> dict[str, Any]:
    """p50/p95/p99/max (nearest rank, ms-rounded), trials over 1 s, and the count."""
    s = sorted(xs)

    def q(f: float) -> float:
        return round(s[min(len(s) - 1, int(f * len(s)))], 3)
    return {"p50": q(0.5), "p95": q(0.95), "p99": q(0.99), "max": round(s[-1], 3),
            "over_1s": sum(1 for x in s if x > 1.0), "n": len(s)}
