# layer: shell — files on disk, processes and namespaces of the running system (os)
"""What a lab made, written down before it is made, so that it can all be undone.

One JSON line per thing, fsynced before the command that creates it runs: if the lab
is killed at any moment, its ledger names everything it may have created (at worst
one thing that never came to exist, which ``clean`` skips). ``clean`` undoes exactly
what a ledger lists, in reverse order, and nothing else: a namespace, process or
directory the lab did not record is never touched.

Ledgers live in ``/run/rumor-lab`` (a tmpfs: namespaces do not survive a reboot, and
neither do their ledgers).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_DIR = Path(os.environ.get("RUMOR_LAB_DIR", "/run/rumor-lab"))


class LedgerError(Exception):
    pass


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks (field 22 of /proc/PID/stat): with the
    pid, it names one process even after the pid is reused."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


@dataclass(slots=True)
class Ledger:
    path: Path
    lab: str
    entries: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def create(cls, directory: Path, lab: str, meta: dict[str, Any]) -> Ledger:
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{lab}.jsonl"
        if path.exists():
            raise LedgerError(f"{path} exists: a lab {lab} is running or was not cleaned "
                              f"(rumor lab clean {lab})")
        ledger = cls(path, lab)
        ledger.record({"kind": "lab", "lab": lab, "pid": os.getpid(),
                       "pid_start": _start_time(os.getpid()), "at": time.time()} | meta)
        return ledger

    @classmethod
    def load(cls, path: Path) -> Ledger:
        entries = []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                e = json.loads(line)
            except ValueError:
                # The last line of a lab killed while writing it: that thing was never
                # made (it is written before the command runs).
                continue
            if not isinstance(e, dict) or "kind" not in e:
                raise LedgerError(f"{path}:{n}: not a ledger entry")
            entries.append(e)
        if not entries or entries[0].get("kind") != "lab":
            raise LedgerError(f"{path}: not a rumor lab ledger")
        return cls(path, str(entries[0]["lab"]), entries)

    def record(self, entry: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.entries.append(entry)

    def netns(self, name: str) -> None:
        self.record({"kind": "netns", "name": name})

    def process(self, pid: int, what: str) -> None:
        self.record({"kind": "process", "pid": pid, "pid_start": _start_time(pid),
                     "what": what})

    def directory(self, path: Path) -> None:
        self.record({"kind": "dir", "path": str(path)})

    @property
    def owner_alive(self) -> bool:
        head = self.entries[0]
        pid = int(head.get("pid", 0))
        return pid > 0 and _start_time(pid) == head.get("pid_start")

    def clean(self, log: list[str] | None = None) -> list[str]:
        """Undo every entry, newest first; returns what was done. Idempotent."""
        done: list[str] = [] if log is None else log
        for e in reversed(self.entries):
            kind = e["kind"]
            if kind == "process":
                pid, started = int(e["pid"]), e.get("pid_start")
                # Only the very process recorded: a reused pid has another start time.
                if pid > 0 and started is not None and _start_time(pid) == started:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                        done.append(f"killed {e.get('what', 'process')} (pid {pid})")
            elif kind == "netns":
                name = str(e["name"])
                if not name.startswith(f"{self.lab}-"):
                    raise LedgerError(f"{self.path}: namespace {name!r} is not the lab's")
                if _netns_exists(name):
                    for pid in _netns_pids(name):
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGKILL)
                            # SIGSTOPped agents die of SIGKILL too.
                    r = subprocess.run(["ip", "netns", "del", name], capture_output=True,
                                       text=True)
                    if r.returncode != 0 and _netns_exists(name):
                        raise LedgerError(f"cannot delete namespace {name}: "
                                          f"{r.stderr.strip()}")
                    done.append(f"deleted namespace {name}")
            elif kind == "dir":
                p = Path(e["path"])
                if p.is_dir() and self.lab in p.name:
                    shutil.rmtree(p, ignore_errors=True)
                    done.append(f"removed {p}")
        self.path.unlink(missing_ok=True)
        return done


def _netns_exists(name: str) -> bool:
    return Path("/run/netns", name).exists()


def _netns_pids(name: str) -> list[int]:
    r = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True)
    return [int(x) for x in r.stdout.split() if x.isdigit()]


def ledgers(directory: Path = DEFAULT_DIR) -> list[Ledger]:
    if not directory.is_dir():
        return []
    return [Ledger.load(p) for p in sorted(directory.glob("rl*.jsonl"))]
