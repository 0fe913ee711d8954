# layer: shell — runs ip, sysctl and nft, and enters network namespaces (os, subprocess)
"""The lab's network, built for real: namespaces, bridge, veths, nftables.

Each command of ``topology.build_steps`` runs here after the ledger has it; the
switch's nftables table comes from ``conditions.py``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Sequence

import trio

from .conditions import (
    TABLE,
    Conditions,
    Counts,
    dropped,
    faults_script,
    parse_counters,
    table_script,
)
from .ledger import Ledger
from .topology import Step, Topology

TOOLS = ("ip", "nft", "sysctl")


class LabError(Exception):
    """The lab cannot run here, or a command of it failed (the message says which)."""


def why_not_here() -> str | None:
    """None when this machine can run a lab; otherwise the reason, to print."""
    if os.geteuid() != 0:
        return ("rumor lab needs root: it creates network namespaces, veth links, a "
                "bridge and nftables rules (run it with sudo)")
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        return (f"rumor lab needs {', '.join(missing)} (Debian: apt-get install iproute2 "
                "nftables procps)")
    probe = f"rlprobe{os.getpid()}"
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if r.returncode != 0:
        return f"cannot create a network namespace: {r.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def run(step: Step | Sequence[str], stdin: str | None = None) -> str:
    argv = list(step.argv if isinstance(step, Step) else step)
    r = subprocess.run(argv, input=stdin, capture_output=True, text=True)
    if r.returncode != 0:
        what = step.what if isinstance(step, Step) else " ".join(argv)
        raise LabError(f"{what}: {' '.join(argv)} failed: {r.stderr.strip()}")
    return r.stdout


class Network:
    """A built lab network: its topology, its switch's rules, its counters."""

    def __init__(self, topology: Topology, ledger: Ledger) -> None:
        self.topology = topology
        self.ledger = ledger
        self.ports = [h.port for h in topology.hosts]
        self.conditions = Conditions()

    def build(self) -> None:
        from .topology import host_steps, switch_steps
        t = self.topology
        self._netns(t.switch)
        for s in switch_steps(t):
            run(s)
        for h in t.hosts:
            self._netns(h.netns)
            for s in host_steps(t, h):
                run(s)
        run(["ip", "netns", "exec", t.switch, "nft", "-f", "-"],
            stdin=table_script(self.ports))

    def _netns(self, name: str) -> None:
        self.ledger.netns(name)
        run(Step(f"namespace {name}", ("ip", "netns", "add", name)))

    def _nft_argv(self) -> list[str]:
        return ["ip", "netns", "exec", self.topology.switch, "nft", "-f", "-"]

    async def apply(self, c: Conditions) -> None:
        """Replace the conditions in one nftables transaction."""
        script = faults_script(c, self.ports)
        r = await trio.run_process(self._nft_argv(), stdin=script.encode(),
                                   capture_stdout=True, capture_stderr=True, check=False)
        if r.returncode != 0:
            raise LabError(f"nft: {r.stderr.decode().strip()}\n{script}")
        self.conditions = c

    async def _chain(self, chain: str) -> str:
        """``nft -j list chain`` of the switch's table: the rules and their counters."""
        r = await trio.run_process(["ip", "netns", "exec", self.topology.switch, "nft",
                                    "-j", "list", "chain", "bridge", TABLE, chain],
                                   capture_stdout=True, capture_stderr=True, check=False)
        if r.returncode != 0:
            raise LabError(f"nft counters: {r.stderr.decode().strip()}")
        return r.stdout.decode()

    async def counters(self) -> dict[str, Counts]:
        return parse_counters(await self._chain("count"))

    async def dropped(self) -> int:
        """Packets the current conditions dropped so far."""
        return dropped(await self._chain("faults"))


def socket_in(netns: str, family: int, kind: int) -> socket.socket:
    """A socket made inside ``netns`` (it stays there; this thread does not)."""
    from .nfqueue import NfQueueError, in_netns
    try:
        with in_netns(netns):
            return socket.socket(family, kind)
    except NfQueueError as e:
        raise LabError(str(e)) from None


class DelayLine:
    """The delay line process (``delay_line.py``) for the hosts that have a delay, and
    the NFQUEUE rules that feed it (inside their namespaces, so they go with them)."""

    def __init__(self, network: Network, delays: dict[str, str], seed: int) -> None:
        self.network = network
        self.delays = delays
        self.seed = seed
        self.proc: trio.Process | None = None
        self.stats_file = network.ledger.path.with_suffix(".delay.json")
        self.stats: dict[str, object] | None = None

    async def start(self) -> None:
        from .delay_line import delay_rules
        queues = []
        for name, spec in sorted(self.delays.items()):
            host = self.network.topology.host(name)
            for do, _undo in delay_rules("eth0", 0):
                run(["ip", "netns", "exec", host.netns, *do])
            queues += ["--queue", f"{host.netns}:0:{spec}"]
        argv = [sys.executable, "-m", "rumor.simulations.lab.delay_line", *queues,
                "--seed", str(self.seed), "--stats-file", str(self.stats_file)]
        proc = await trio.lowlevel.open_process(argv, stdin=subprocess.DEVNULL,
                                                stdout=subprocess.PIPE)
        self.network.ledger.process(proc.pid, "delay line")
        self.proc = proc
        assert proc.stdout is not None
        got = b""
        with trio.move_on_after(30):
            while b"ready" not in got:
                chunk = await proc.stdout.receive_some(4096)
                if not chunk:
                    break
                got += chunk
        if b"ready" not in got:
            raise LabError(f"the delay line did not start (exit {proc.returncode})")

    async def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        with trio.move_on_after(10):
            await self.proc.wait()
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        with contextlib.suppress(OSError, ValueError):
            self.stats = json.loads(self.stats_file.read_text())
        self.stats_file.unlink(missing_ok=True)
