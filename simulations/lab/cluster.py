# layer: shell — runs agent processes in namespaces and reads their logs (trio, os, time)
"""Real agents in the lab's namespaces, watched through their own logs.

Each host runs ``rumor agent`` under ``ip netns exec`` (which execs it, so the pid we
hold is the agent's: ``kill -9`` and SIGSTOP land on it). Its JSON log comes back on
a pipe; every ``member`` line becomes the same ``MemberEvent`` the simulator's cores
emit and goes to the simulator's own ``Recorder``, so both sides compute every figure
with one piece of code. Times are the agents' own timestamps (one machine, one clock),
relative to the lab's start.
"""

from __future__ import annotations

import heapq
import json
import os
import signal
import socket as pysocket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import trio

from ...gossip.effects import MemberEvent
from ...gossip.wire import Status
from ..metrics import Recorder
from .conditions import Counts
from .kernel import LabError, Network, socket_in
from .ledger import Ledger
from .topology import Host

GOSSIP_PORT = 7946
API_PORT = 7947
INBOUND_PORT = 15002
OUTBOUND_PORT = 15001
DNS_PORT = 8600
STATUS = {name: code for code, name in Status.NAMES.items()}
#: The cluster name in node credentials (the simulator's ``SimIdentities.CLUSTER``).
CLUSTER = "sim"
#: How long a log record may wait for older ones still in another agent's pipe.
REORDER = 0.3


def rumor_command() -> list[str]:
    """How the lab runs an agent: this interpreter's rumor (``RUMOR_LAB_BIN`` overrides,
    e.g. an older build's venv for a mixed cluster)."""
    override = os.environ.get("RUMOR_LAB_BIN")
    return override.split() if override else [sys.executable, "-m", "rumor.cli"]


@dataclass(slots=True)
class LabNode:
    """One host as the Recorder sees a simulated node."""

    idx: int
    name: str
    host: Host
    up: bool = False
    proc: trio.Process | None = None
    paused: bool = False
    lives: int = 0
    #: The agent's ``start`` log line arrived (its sockets are bound).
    started: trio.Event = field(default_factory=trio.Event)
    log: list[str] = field(default_factory=list)


class LabCluster:
    """The Recorder's view of the lab (it duck-types the Simulator: ``nodes``,
    ``by_name``, ``now``, ``on_member``) and the agents' lifecycle."""

    def __init__(self, network: Network, ledger: Ledger, workdir: Path, family: int,
                 profile: str, tune: Sequence[str] = (), sidecar: bool = True,
                 dns: bool = False, extra_args: Sequence[str] = ()) -> None:
        self.network = network
        self.ledger = ledger
        self.workdir = workdir
        self.family = family
        self.profile = profile
        self.tune = list(tune)
        self.sidecar = sidecar
        self.dns = dns
        self.extra_args = list(extra_args)
        #: More arguments for one agent (its services, say), by node name.
        self.node_args: dict[str, list[str]] = {}
        self.nodes = [LabNode(h.index, h.name, h) for h in network.topology.hosts]
        self.by_name = {n.name: n.idx for n in self.nodes}
        self.t0 = time.time()
        self.events = 0
        self.recorder = Recorder(self)  # type: ignore[arg-type]  # duck-typed Simulator
        self._nursery: trio.Nursery | None = None
        #: What each agent last said of each member: observer -> member -> status.
        self.view: dict[int, dict[str, int]] = {n.idx: {} for n in self.nodes}
        #: Called with a node when its agent logs that it started (joins are timed
        #: from there: the interpreter's start-up is not the protocol's).
        self.on_started: Callable[[LabNode], None] | None = None
        #: Refutations the agents logged (their own, as the simulator's counter).
        self.refutations = 0
        self.delay: dict[str, str] = {}
        self.delay_line_stats: dict[str, object] | None = None
        #: Log records wait here up to ``REORDER`` seconds and reach the recorder in
        #: timestamp order: pipes are read in whatever order the scheduler picks, but a
        #: join must be tracked before anyone's word of it is counted.
        #: The kernel's counters when the joins began (converge's traffic window).
        self.join_snapshot: tuple[float, dict[str, Counts]] | None = None
        self._pending: list[tuple[float, int, LabNode, dict[str, Any]]] = []
        self._seq = 0

    def on_member(self, now: float, observer: int, ev: MemberEvent) -> None:
        """Replaced by the Recorder's listener."""

    @property
    def now(self) -> float:
        return time.time() - self.t0

    def addr(self, node: LabNode) -> str:
        a = node.host.address(self.family)
        return f"[{a}]" if self.family == 6 else a

    def argv(self, node: LabNode, seeds: Sequence[LabNode]) -> list[str]:
        any_addr = "[::]" if self.family == 6 else "0.0.0.0"
        data = self.workdir / node.name
        argv = ["ip", "netns", "exec", node.host.netns, *rumor_command(), "agent",
                "--name", node.name, "--bind", f"{any_addr}:{GOSSIP_PORT}",
                "--advertise", f"{self.addr(node)}:{GOSSIP_PORT}",
                "--api", f"127.0.0.1:{API_PORT}", "--profile", self.profile,
                "--log-format", "json", "--data-dir", str(data),
                "--node-identity", "require", "--node-cluster", CLUSTER,
                "--trust-key", str(self.workdir / "authority.pub")]
        for t in self.tune:
            argv += ["--tune", t]
        if self.sidecar:
            argv += ["--inbound", f"{any_addr}:{INBOUND_PORT}",
                     "--outbound", f"127.0.0.1:{OUTBOUND_PORT}"]
        if self.dns:
            argv += ["--dns", f"127.0.0.1:{DNS_PORT}"]
        for s in seeds:
            argv += ["--join", f"{self.addr(s)}:{GOSSIP_PORT}"]
        return argv + self.extra_args + self.node_args.get(node.name, [])

    async def spawn(self, node: LabNode, argv: Sequence[str], what: str) -> trio.Process:
        """Another process in a host's namespace (a backend, a client); it is in the
        ledger and dies with the namespace at the latest."""
        proc = await trio.lowlevel.open_process(
            ["ip", "netns", "exec", node.host.netns, *argv], stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.ledger.process(proc.pid, what)
        return proc

    def issue_credentials(self) -> None:
        """Node keys and credentials signed by one authority key of the lab's, as the
        simulator's ``SimIdentities`` (``rumor keygen`` + ``rumor policy credential``
        by hand): both sides then send the same signed messages."""
        from ...gossip.node_key import (
            CREDENTIAL_CONTEXT,
            credential_payload,
            encode_credential,
            load_or_create_key,
            save_credential,
        )
        from ...policy.keys import load_secret_key, write_keypair
        secret_path, _, _ = write_keypair(self.workdir / "authority")
        signer = load_secret_key(secret_path)
        for n in self.nodes:
            data = self.workdir / n.name
            data.mkdir(exist_ok=True)
            key, _ = load_or_create_key(data)
            payload = credential_payload(CLUSTER, n.name, key.public, int(time.time()))
            sig = (signer.public.id, signer.sign(CREDENTIAL_CONTEXT + payload))
            save_credential(data, encode_credential("ed25519", payload, [sig]))

    # ---- lifecycle ------------------------------------------------------------------------

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) \
            -> None:
        """Own the agents' log readers; cancelled at the end of the lab."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._flusher)
            task_status.started()
            await trio.sleep_forever()

    async def start(self, node: LabNode, seeds: Sequence[LabNode] = ()) -> None:
        assert self._nursery is not None, "LabCluster.run is not running"
        if node.up:
            raise LabError(f"{node.name} is already running")
        node.started = trio.Event()
        proc = await trio.lowlevel.open_process(
            self.argv(node, seeds), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT)
        self.ledger.process(proc.pid, f"agent {node.name}")
        node.proc, node.up, node.paused = proc, True, False
        node.lives += 1
        self.view[node.idx] = {}
        self._nursery.start_soon(self._read, node, proc)

    async def wait_started(self, nodes: Sequence[LabNode], timeout: float = 60.0) -> None:
        with trio.move_on_after(timeout) as scope:
            for n in nodes:
                await n.started.wait()
        if scope.cancelled_caught:
            late = [n.name for n in nodes if not n.started.is_set()]
            tails = {n.name: n.log[-5:] for n in nodes if not n.started.is_set()}
            raise LabError(f"agents did not start within {timeout:.0f} s: {late}; last "
                           f"lines: {json.dumps(tails)[:2000]}")

    async def _read(self, node: LabNode, proc: trio.Process) -> None:
        assert proc.stdout is not None
        buf = b""
        life = node.lives
        async with proc.stdout:
            while True:
                try:
                    chunk = await proc.stdout.receive_some(65536)
                except trio.ClosedResourceError:
                    return
                if not chunk:
                    return
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    self._line(node, life, line)

    def _line(self, node: LabNode, life: int, raw: bytes) -> None:
        text = raw.decode("utf-8", "replace")
        node.log.append(text)
        if len(node.log) > 400:
            del node.log[:200]
        if not text.startswith("{"):
            return
        try:
            ev: dict[str, Any] = json.loads(text)
        except ValueError:
            return
        if not isinstance(ev, dict) or life != node.lives:
            return
        if ev.get("event") == "start":
            node.started.set()
        if ev.get("event") in ("start", "member") or ev.get("kind") == "refuted":
            self._seq += 1
            heapq.heappush(self._pending, (_timestamp(ev.get("ts")) - self.t0, self._seq,
                                           node, ev))

    def flush(self, upto: float) -> None:
        """Deliver the records stamped before ``upto`` (lab time), oldest first."""
        while self._pending and self._pending[0][0] <= upto:
            t, _, node, ev = heapq.heappop(self._pending)
            self._deliver(t, node, ev)

    async def _flusher(self) -> None:
        while True:
            self.flush(self.now - REORDER)
            await trio.sleep(0.01)

    def _deliver(self, t: float, node: LabNode, ev: dict[str, Any]) -> None:
        kind = ev.get("event")
        if kind == "start":
            if self.on_started is not None:
                self.on_started(node)
            return
        if not node.up:
            return
        if ev.get("kind") == "refuted":
            self.refutations += 1
        if kind != "member":
            return
        status = STATUS.get(str(ev.get("status")))
        member = ev.get("member")
        if status is None or not isinstance(member, str):
            return
        host, _, port = str(ev.get("addr", "")).rpartition(":")
        self.events += 1
        self.view[node.idx][member] = status
        try:
            addr = (host.strip("[]"), int(port or 0))
            incarnation = int(ev.get("incarnation", 0))
        except ValueError:
            return
        self.on_member(t, node.idx, MemberEvent(str(ev.get("kind", "")), member, status,
                                                incarnation, addr))

    async def kill(self, node: LabNode, sig: int = signal.SIGKILL) -> None:
        """``kill -9``: the agent dies without a word; its namespace stays up."""
        proc = node.proc
        if proc is None or not node.up:
            raise LabError(f"{node.name} is not running")
        node.up = False
        proc.send_signal(sig)
        if node.paused:
            proc.send_signal(signal.SIGCONT)
        await proc.wait()

    def pause(self, node: LabNode) -> None:
        if node.proc is not None and node.up and not node.paused:
            node.proc.send_signal(signal.SIGSTOP)
            node.paused = True

    def resume(self, node: LabNode) -> None:
        if node.proc is not None and node.up and node.paused:
            node.proc.send_signal(signal.SIGCONT)
            node.paused = False

    async def stop_all(self) -> None:
        for n in self.nodes:
            if n.proc is not None and n.proc.returncode is None:
                n.up = False
                n.proc.send_signal(signal.SIGKILL)
                n.proc.send_signal(signal.SIGCONT)
        for n in self.nodes:
            if n.proc is not None:
                await n.proc.wait()

    async def api(self, node: LabNode, method: str, path: str,
                  body: dict[str, Any] | None = None, timeout: float = 5.0) -> Any:
        """One request to the agent's API, from inside its namespace (its API is on the
        namespace's own loopback, which nothing outside can reach)."""
        import h11
        data = b"" if body is None else json.dumps(body).encode()
        sock = trio.socket.from_stdlib_socket(
            socket_in(node.host.netns, pysocket.AF_INET, pysocket.SOCK_STREAM))
        conn = h11.Connection(h11.CLIENT)
        headers = [("Host", f"127.0.0.1:{API_PORT}"), ("Content-Length", str(len(data))),
                   ("Content-Type", "application/json"), ("Connection", "close")]
        with trio.fail_after(timeout):
            await sock.connect(("127.0.0.1", API_PORT))
            async with trio.SocketStream(sock) as stream:
                out = conn.send(h11.Request(method=method, target=path, headers=headers))
                if data:
                    out = (out or b"") + (conn.send(h11.Data(data=data)) or b"")
                await stream.send_all((out or b"") + (conn.send(h11.EndOfMessage()) or b""))
                status, chunks = 0, []
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        conn.receive_data(await stream.receive_some(65536))
                    elif isinstance(event, h11.Response):
                        status = event.status_code
                    elif isinstance(event, h11.Data):
                        chunks.append(bytes(event.data))
                    elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                        break
        text = b"".join(chunks)
        if status >= 300:
            raise LabError(f"{node.name}: {method} {path} answered {status}: "
                           f"{text[:300]!r}")
        return json.loads(text) if text else None

    async def join(self, node: LabNode, seeds: Sequence[LabNode]) -> None:
        await self.api(node, "PUT", "/v1/join",
                       {"addrs": [f"{self.addr(s)}:{GOSSIP_PORT}" for s in seeds]})

    # ---- what the agents believe ----------------------------------------------------------

    def alive_seen(self, node: LabNode) -> set[str]:
        return {m for m, st in self.view[node.idx].items() if st == Status.ALIVE} | \
            {node.name}

    def convergence_gaps(self) -> dict[str, list[str]]:
        names = {n.name for n in self.nodes if n.up}
        return {n.name: sorted(names - self.alive_seen(n)) for n in self.nodes
                if n.up and names - self.alive_seen(n)}

    def joins_failed(self) -> int:
        return sum(1 for n in self.nodes[1:]
                   if not any(line.find('"event": "joined"') >= 0 for line in n.log))

    def cross_failed(self, side_a: frozenset[int]) -> float:
        """Fraction of (observer, subject) pairs across the split listed failed, by
        the running agents."""
        pairs = failed = 0
        for n in self.nodes:
            if not n.up:
                continue
            mine = n.idx in side_a
            for name, st in self.view[n.idx].items():
                other = self.by_name.get(name)
                if other is not None and (other in side_a) != mine:
                    pairs += 1
                    failed += st == Status.DEAD
        return round(failed / pairs, 4) if pairs else 0.0

    def forget_members(self, node: LabNode) -> None:
        """A restart with fresh state, as the simulator's: the node keeps its key (a
        new one under the same name would be refused as a forgery) but not the
        members it knew."""
        (self.workdir / node.name / "members.json").unlink(missing_ok=True)

    def describe_network(self) -> dict[str, Any]:
        c = self.network.conditions
        return {"kind": "lab", "family": self.family, "delay": dict(self.delay),
                "loss": c.loss, "cuts": len(c.cuts)}

    # ---- what the kernel counted ----------------------------------------------------------

    async def traffic_snapshot(self) -> tuple[float, dict[str, Counts]]:
        return self.now, await self.network.counters()

    def traffic_report(self, start: tuple[float, dict[str, Counts]],
                       end: tuple[float, dict[str, Counts]]) -> dict[str, Any]:
        """The simulator's ``Traffic.report`` keys from the kernel's counters: payload
        bytes (UDP exactly, TCP less its estimated headers), per live node per second."""
        dt = end[0] - start[0]
        live = [n for n in self.nodes if n.up]
        if dt <= 0 or not live:
            return {}
        zero = Counts()

        def per(n: LabNode) -> tuple[float, float, float, float]:
            a, b = start[1].get(n.host.port, zero), end[1].get(n.host.port, zero)
            return ((b.udp_packets - a.udp_packets) / dt,
                    (b.udp_payload(self.family) - a.udp_payload(self.family)) / dt,
                    (b.syn_packets - a.syn_packets) / dt,
                    (b.tcp_payload(self.family) - a.tcp_payload(self.family)) / dt)
        rows = [per(n) for n in live]

        def mean(i: int) -> float:
            return round(sum(r[i] for r in rows) / len(rows), 6)
        return {"window_s": round(dt, 6),
                "packets_per_node_per_s": mean(0),
                "packets_per_node_per_s_max": round(max(r[0] for r in rows), 6),
                "bytes_per_node_per_s": mean(1),
                "bytes_per_node_per_s_max": round(max(r[1] for r in rows), 6),
                "streams_per_node_per_s": mean(2),
                "stream_bytes_per_node_per_s": mean(3),
                "counted": "payload: UDP exactly (kernel IP bytes less 28/48 per packet), "
                           "TCP less 52/72 bytes per segment (timestamps) and 8 per SYN"}


def _timestamp(ts: object) -> float:
    if isinstance(ts, str):
        try:
            return datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()
        except ValueError:
            pass
    return time.time()
