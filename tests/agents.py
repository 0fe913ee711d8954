"""Real ``rumor agent`` processes on 127.0.0.1 for integration tests.

Ports are picked here (free for both UDP and TCP), every process is started with the
fast ``local`` profile, and ``AgentCluster.close()`` kills whatever is still running.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .ports import free_port

if TYPE_CHECKING:
    from rumor.policy.keys import SecretKey

HOST = "127.0.0.1"


def rumor_cmd() -> list[str]:
    return [sys.executable, "-m", "rumor.cli"]


def rumor(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a ``rumor`` CLI command; fail the test with its output if it fails."""
    res = subprocess.run([*rumor_cmd(), *args], capture_output=True, text=True, timeout=60)
    if check and res.returncode != 0:
        raise AssertionError(f"rumor {' '.join(args)} failed ({res.returncode}): "
                             f"{res.stderr}{res.stdout}")
    return res


class Agent:
    def __init__(self, name: str, workdir: Path, extra: list[str] | None = None,
                 env: dict[str, str] | None = None,
                 command: Sequence[str] | None = None) -> None:
        self.name = name
        #: Environment variables set for the process, over the test's own.
        self.env = env or {}
        #: How to run ``rumor`` (default: this interpreter's ``-m rumor.cli``).
        self.command = list(command) if command is not None else rumor_cmd()
        self.port = free_port()
        self.api_port = free_port()
        self.log = workdir / f"{name}.log"
        self.extra = extra or []
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def addr(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def api(self) -> str:
        return f"{HOST}:{self.api_port}"

    def start(self, join: Agent | None = None,
              preexec_fn: Callable[[], None] | None = None) -> None:
        argv = [*self.command, "agent", "--name", self.name, "--bind", self.addr,
                "--api", self.api, "--profile", "local", "--log-format", "json", *self.extra]
        if join is not None:
            argv += ["--join", join.addr]
        with open(self.log, "ab") as f:
            self.proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, preexec_fn=preexec_fn,
                                         env={**os.environ, **self.env})

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(f"http://{self.api}{path}", timeout=2) as r:
            return json.loads(r.read())

    def members(self) -> dict[str, dict[str, Any]]:
        try:
            return {m["name"]: m for m in self.get("/v1/members")}
        except (OSError, ValueError, urllib.error.URLError):
            return {}

    def status_of(self, name: str) -> str | None:
        m = self.members().get(name)
        return None if m is None else str(m["status"])

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait_exit(self, timeout: float = 10) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def rss_kb(self) -> int:
        """Resident memory of the agent process (Linux), in KiB."""
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")

    def events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log.read_text().splitlines():
            if line.startswith("{"):
                ev = json.loads(line)
                if ev.get("event") == "member":
                    out.append(ev)
        return out


class AgentCluster:
    def __init__(self, workdir: Path, command: Sequence[str] | None = None) -> None:
        self.workdir = workdir
        self.command = command
        self.agents: list[Agent] = []

    def start(self, n: int,
              extra: Callable[[int], list[str]] | Sequence[str] = (),
              preexec: Callable[[int], Callable[[], None] | None] | None = None,
              ) -> list[Agent]:
        """Start ``n`` agents, each joining the first, and wait until they converge;
        ``extra`` are more options for every agent, or a function of its index, and
        ``preexec`` gives an agent's ``preexec_fn`` (resource limits) by index."""
        for i in range(n):
            more = extra(i) if callable(extra) else list(extra)
            a = Agent(f"a{i}", self.workdir, more, command=self.command)
            a.start(self.agents[0] if self.agents else None,
                    preexec_fn=None if preexec is None else preexec(i))
            self.agents.append(a)
            if i == 0:
                wait_for(a.members, 20, "the seed's API")
        wait_for(lambda: self.converged(n), 30, f"{n} agents to converge")
        return self.agents

    def converged(self, n: int, among: list[Agent] | None = None) -> bool:
        return all(sum(1 for m in a.members().values() if m["status"] == "alive") == n
                   for a in (among or self.agents))

    def close(self) -> None:
        for a in self.agents:
            if a.proc is not None and a.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(a.proc.pid, signal.SIGCONT)
                a.proc.kill()
                a.proc.wait(timeout=10)


def publish_policy(key: SecretKey, agents: Sequence[Agent], kind: str, name: str, version: int,
                   body: str) -> None:
    """Sign a policy document with ``key``, PUT it to the first agent's
    API and wait until every one of ``agents`` holds that version."""
    from rumor.policy.envelope import make_payload, sign
    text = f'kind = "{kind}"\nname = "{name}"\nversion = {version}\n{body}'
    data = sign(make_payload(kind, name, version, time.time(), None, text.encode()),
                [key]).encode()
    req = urllib.request.Request(f"http://{agents[0].api}/v1/policies", data=data,
                                 method="PUT",
                                 headers={"content-type": "application/x-rumor-envelope"})
    with urllib.request.urlopen(req, timeout=5) as r:
        assert json.loads(r.read())["status"] == "accepted"
    wait_for(lambda: all({d["name"]: d["version"] for d in a.get("/v1/policies")
                          ["documents"]}.get(name) == version for a in agents),
             10, f"{name} v{version} everywhere")


def open_silent(port: int, n: int, source: str) -> list[socket.socket]:
    """``n`` connections to ``port`` on 127.0.0.1 from ``source`` (another loopback
    address, as another host), started and never written to; the caller closes them."""
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind((source, 0))
        s.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            s.connect((HOST, port))
        socks.append(s)
    return socks


def wait_for(cond: Callable[[], object], timeout: float, what: str) -> float:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)
    return time.monotonic() - t0


REPO = Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def previous_build(tmp: Path, rev: str) -> Any:
    """A git worktree of build ``rev`` (for mixed-version tests: run an agent of it with
    ``env={"PYTHONPATH": str(tree / ".typecheck")}``), removed afterwards; None when
    this checkout has no git or no such commit (the test should skip)."""
    import shutil
    tree = tmp / "previous"
    made = shutil.which("git") is not None and subprocess.run(
        ["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), rev],
        capture_output=True, text=True).returncode == 0
    try:
        yield tree if made else None
    finally:
        if made:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force",
                            str(tree)], capture_output=True)
