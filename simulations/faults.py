"""Faults on a schedule: crashes, restarts, pauses, slow nodes and partitions.

A fault is a small frozen record; ``install`` turns a list of them into timed calls
on the simulator and tells the recorder the ground truth (who really crashed, who
was made slow) so that false positives can be told from detections.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .engine import Simulator
from .metrics import Recorder
from .network import Partition


@dataclass(frozen=True, slots=True)
class Crash:
    at: float
    nodes: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Restart:
    """Same name and address, fresh state; joins through ``seeds``."""

    at: float
    nodes: tuple[int, ...]
    seeds: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Pause:
    """SIGSTOP at ``at``, SIGCONT ``duration`` seconds later."""

    at: float
    node: int
    duration: float


@dataclass(frozen=True, slots=True)
class Slow:
    """A slow node: stalled for exponential spells (mean ``mean_pause``) separated by
    exponential runs (mean ``mean_run``) between ``start`` and ``end``. ``stall``
    freezes only its message handling (timers still fire: a starved receive path, the
    Lifeguard paper's slow member); otherwise the whole process stops (SIGSTOP)."""

    node: int
    start: float
    end: float
    mean_pause: float
    mean_run: float
    stall: bool = True


@dataclass(frozen=True, slots=True)
class Split:
    """Partition ``a`` from ``b`` (everyone else if empty) at ``at``; heal at ``heal_at``.
    Asymmetric splits only black-hole traffic from ``a`` to ``b``."""

    at: float
    heal_at: float
    a: frozenset[int]
    b: frozenset[int] = frozenset()
    symmetric: bool = True


Fault = Crash | Restart | Pause | Slow | Split


def install(sim: Simulator, rec: Recorder, faults: Sequence[Fault], seed: int) -> None:
    rng = random.Random(f"faults:{seed}")
    for f in faults:
        if isinstance(f, Crash):
            sim.at(f.at, _crash(sim, rec, f.nodes))
        elif isinstance(f, Restart):
            sim.at(f.at, _restart(sim, f))
        elif isinstance(f, Pause):
            rec.slow.add(f.node)
            sim.at(f.at, _call(sim.pause, f.node))
            sim.at(f.at + f.duration, _call(sim.resume, f.node))
        elif isinstance(f, Slow):
            rec.slow.add(f.node)
            t = f.start + rng.expovariate(1 / f.mean_run)
            while t < f.end:
                d = rng.expovariate(1 / f.mean_pause)
                sim.at(t, _call(sim.stall if f.stall else sim.pause, f.node))
                sim.at(min(t + d, f.end), _call(sim.resume, f.node))
                t += d + rng.expovariate(1 / f.mean_run)
        else:
            start, heal = _split(sim, Partition(f.a, f.b, f.symmetric))
            sim.at(f.at, start)
            sim.at(f.heal_at, heal)


def _call(fn: Callable[[int], None], idx: int) -> Callable[[], None]:
    def run() -> None:
        fn(idx)
    return run


def _crash(sim: Simulator, rec: Recorder, nodes: tuple[int, ...]) -> Callable[[], None]:
    def run() -> None:
        for i in nodes:
            sim.crash(i)
        for i in nodes:
            rec.crashed(i)
    return run


def _restart(sim: Simulator, f: Restart) -> Callable[[], None]:
    def run() -> None:
        for i in f.nodes:
            sim.restart(i, [s for s in f.seeds if s != i and sim.nodes[s].up])
    return run


def _split(sim: Simulator, part: Partition) -> tuple[Callable[[], None], Callable[[], None]]:
    def start() -> None:
        sim.network.partitions.append(part)

    def heal() -> None:
        sim.network.partitions.remove(part)
    return start, heal
