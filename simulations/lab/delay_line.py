# layer: shell — NFQUEUE sockets, a timerfd, signals, the clock and a CLI process
"""The lab's delay line: netem's delay, in user space, for kernels without sch_netem.

Each lab host's incoming packets (or outgoing: ``delay_rules``) are queued to this
process by an iptables NFQUEUE rule. The kernel keeps each packet and hands us its id
and first bytes; we compute its release time (``delay_schedule``: the simulator's
latency specs, FIFO per source/destination pair) and send the ACCEPT verdict when that
time comes. One process serves every namespace of a lab, one netlink socket per
namespace, on one trio loop.

Delay on the receiving side (``direction="ingress"``, the default). A packet held on
its sender's egress still belongs to the sending socket: TCP Small Queues then lets a
connection have only a couple of packets below it, so a 20 ms line cut a TCP bulk
transfer to ~270 KB/s (20 MB in 75 s, against 0.35 s held on the receiver's ingress),
and UDP senders hit their send buffer (netem avoids this by orphaning the packets it
holds, which user space cannot do). Crossing the veth orphans the packet, so held on
the receiver's ingress it is charged to nobody.

    python -m rumor.simulations.lab.delay_line \\
        --queue NETNS:QUEUENUM:SPEC [--queue ...] --seed S [--stats-file F]

It prints ``ready`` on stdout once every queue is bound. On SIGTERM or SIGINT it stops
the kernel from queueing more (queue length 0 with fail-open: new packets pass
undelayed), accepts everything it still holds, so stopping loses no packet, and writes
its stats (JSON, below) to the stats file and to stderr. SIGUSR1 writes the stats
file without stopping.

Failure modes, chosen so the lab degrades to "no delay" rather than to "no network":

* the rules use ``--queue-bypass``: with no process bound to the queue (not started
  yet, crashed, stopped), packets pass undelayed instead of being dropped;
* the queue is fail-open by default: when the kernel's queue is full (``--maxlen``) or
  our socket buffer overflows, the packet passes undelayed. Socket overflows show in
  the stats as ``overflows``/``missed``; a full queue shows as ``held_max`` reaching
  ``maxlen``. ``--fail-closed`` drops instead (the kernel counts those drops:
  ``kernel.queue_dropped``);
* if this process dies (SIGKILL), the packets it held at that moment are dropped by the
  kernel (at most rate × delay of them); later ones bypass.

Release timing uses a timerfd (wakes within microseconds) rather than trio's own
timeouts, which epoll rounds up to whole milliseconds.

Stats file (JSON, ``"format": 1``): ``wall_seconds``, ``cpu_seconds`` (user+system of
this process from ``ready`` to exit, getrusage; split in ``cpu_user_seconds`` and
``cpu_system_seconds``; ``cpu_seconds_total`` includes startup), ``packets``,
``cpu_us_per_packet``, ``lateness_seconds`` (verdict time minus scheduled release:
``count``, ``p50``, ``p99``, ``max``, ``mean``), ``released_at_stop``, ``seed``,
``maxlen``, ``fail_open``, and ``queues``: one object per ``--queue`` with ``netns``,
``queue``, ``spec``, ``packets``, ``held_max``, ``held_at_stop``, ``overflows``,
``missed``, ``verdict_messages``, ``batch_verdicts``, ``sends``, ``verdict_errors`` and
``kernel`` (the kernel's counters for the queue at stop, or null). The system CPU
includes the kernel's work of passing each released packet on (the verdict's send()
reinjects it and runs the rest of its path), work done in some other context without
the delay line.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import heapq
import json
import os
import random
import resource
import signal
import sys
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import trio

from rumor.simulations.lab.delay_schedule import (
    DelaySchedule,
    LatenessHistogram,
    flow_key,
    parse_delay_spec,
)
from rumor.simulations.lab.nfqueue import NfQueue, NfQueueError, kernel_queue_stats
from rumor.simulations.network import Latency

IPTABLES = ("iptables-legacy", "ip6tables-legacy")


def delay_rules(iface: str, queue_num: int, *, direction: str = "ingress"
                ) -> list[tuple[list[str], list[str]]]:
    """The iptables commands that send a host's packets through the delay line's queue
    ``queue_num``: those arriving on ``iface`` (``direction="ingress"``, mangle
    PREROUTING ``-i``) or leaving by it (``"egress"``, mangle POSTROUTING ``-o``). As
    (do, undo) argv pairs, IPv4 then IPv6; run them inside the host's namespace
    (``ip netns exec NS ...``).

    Ingress is the default because packets held on their sender's egress still count
    against the sending socket (TCP Small Queues throttles a held TCP connection to a
    few packets per delay; the module docstring has the figures). A delay on every
    host's ingress gives each path the one-way delay once, as egress would.

    The ``-legacy`` binaries, because iptables-nft would translate NFQUEUE into an
    nftables ``queue`` expression this kernel lacks. ``--queue-bypass``: while no delay
    line is bound to the queue (before it starts, after it stops or dies) packets pass
    undelayed instead of being dropped, so a broken delay line never partitions the
    lab.
    """
    if not iface or len(iface) > 15 or any(c in iface for c in " /:\0"):
        raise ValueError(f"bad interface name {iface!r}")
    if not 0 <= queue_num <= 0xFFFF:
        raise ValueError(f"queue number {queue_num} outside 0..65535")
    if direction == "ingress":
        match = ["PREROUTING", "-i", iface]
    elif direction == "egress":
        match = ["POSTROUTING", "-o", iface]
    else:
        raise ValueError(f"direction must be 'ingress' or 'egress', not {direction!r}")
    rule = [*match, "-j", "NFQUEUE", "--queue-num", str(queue_num), "--queue-bypass"]
    return [([binary, "-t", "mangle", "-A", *rule], [binary, "-t", "mangle", "-D", *rule])
            for binary in IPTABLES]


@dataclass(frozen=True, slots=True)
class QueueSpec:
    """One ``--queue NETNS:QUEUENUM:SPEC``; NETNS ``.`` is this process's namespace."""

    netns: str | None
    queue_num: int
    spec: str
    latency: Latency

    @property
    def label(self) -> str:
        return f"{self.netns or '.'}:{self.queue_num}"


def parse_queue_arg(text: str) -> QueueSpec:
    parts = text.split(":", 2)
    if len(parts) != 3 or not parts[0]:
        raise ValueError(f"bad --queue {text!r}: expected NETNS:QUEUENUM:SPEC, "
                         "e.g. rl-h01:0:fixed:0.020")
    netns, num, spec = parts
    try:
        queue_num = int(num)
    except ValueError:
        raise ValueError(f"bad --queue {text!r}: queue number {num!r} is not an integer") \
            from None
    if not 0 <= queue_num <= 0xFFFF:
        raise ValueError(f"bad --queue {text!r}: queue number outside 0..65535")
    return QueueSpec(None if netns == "." else netns, queue_num, spec,
                     parse_delay_spec(spec))


# -- a timerfd: wake-ups at microsecond precision on trio's epoll ----------------------

class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


CLOCK_MONOTONIC = 1  # the clock of time.monotonic() on Linux
TFD_TIMER_ABSTIME = 1
TFD_NONBLOCK = os.O_NONBLOCK
TFD_CLOEXEC = os.O_CLOEXEC


class DeadlineTimer:
    """A one-shot CLOCK_MONOTONIC timer as a file descriptor trio can wait on."""

    def __init__(self) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)
        fd = self._libc.timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC)
        if fd < 0:
            e = ctypes.get_errno()
            raise OSError(e, f"timerfd_create: {os.strerror(e)}")
        self.fd: int = fd
        self.armed: float | None = None
        self._spec = _Itimerspec()

    def arm(self, deadline: float) -> None:
        """Fire at ``deadline`` (time.monotonic() seconds); replaces any earlier arming."""
        sec = int(deadline)
        nsec = int((deadline - sec) * 1e9)
        if sec <= 0 and nsec <= 0:
            sec, nsec = 0, 1  # zero would disarm
        self._spec.it_value.tv_sec = sec
        self._spec.it_value.tv_nsec = nsec
        if self._libc.timerfd_settime(self.fd, TFD_TIMER_ABSTIME, ctypes.byref(self._spec),
                                      None) != 0:
            e = ctypes.get_errno()
            raise OSError(e, f"timerfd_settime: {os.strerror(e)}")
        self.armed = deadline

    async def wait(self) -> None:
        while True:
            await trio.lowlevel.wait_readable(self.fd)
            try:
                os.read(self.fd, 8)
                self.armed = None
                return
            except BlockingIOError:  # re-armed since it became readable
                continue

    def close(self) -> None:
        os.close(self.fd)


# -- the delay line ------------------------------------------------------------------

@dataclass(slots=True)
class _Line:
    """One queue: its socket, schedule, and the ids it holds in arrival order."""

    spec: QueueSpec
    nfq: NfQueue
    schedule: DelaySchedule
    held: deque[int] = field(default_factory=deque)
    released: set[int] = field(default_factory=set)
    held_max: int = 0
    held_at_stop: int = 0
    #: The kernel's counters for the queue, read at stop.
    kernel: dict[str, int] | None = None

    def release(self, ids: list[int]) -> None:
        """Verdicts for ``ids``: one batch verdict for those below every id still held,
        single verdicts for the rest, all in one sendto()."""
        held, released = self.held, self.released
        released.update(ids)
        while held and held[0] in released:
            released.discard(held.popleft())
        if not held:
            self.nfq.send_verdicts(max(ids), ())
            return
        boundary = held[0]
        prefix = [i for i in ids if i < boundary]
        rest = [i for i in ids if i > boundary]
        if len(prefix) > 1:
            self.nfq.send_verdicts(max(prefix), rest)
        else:
            self.nfq.send_verdicts(None, prefix + rest)

    @property
    def holding(self) -> int:
        return len(self.held) - len(self.released)


class DelayLine:
    """The process's state: the queues, one heap of pending releases, the stats."""

    def __init__(self, specs: Sequence[QueueSpec], seed: int, *, copy_range: int = 40,
                 maxlen: int = 10_000, fail_open: bool = True, rcvbuf: int = 8 << 20,
                 stats_file: Path | None = None) -> None:
        labels = [s.label for s in specs]
        if len(set(labels)) != len(labels):
            raise ValueError(f"a queue is given twice: {labels}")
        self.specs = list(specs)
        self.seed = seed
        self.copy_range = copy_range
        self.maxlen = maxlen
        self.fail_open = fail_open
        self.rcvbuf = rcvbuf
        self.stats_file = stats_file
        self.lines: list[_Line] = []
        self.heap: list[tuple[float, int, int, int]] = []  # (release, seq, line, id)
        self._seq = 0
        self.lateness = LatenessHistogram()
        self.released_at_stop = 0
        self._t_ready = 0.0
        self._cpu_ready = (0.0, 0.0)
        self._timer: DeadlineTimer | None = None

    def open(self) -> None:
        """Bind every queue (raises NfQueueError with the reason), then start the clock."""
        try:
            for spec in self.specs:
                nfq = NfQueue(spec.queue_num, netns=spec.netns, copy_range=self.copy_range,
                              maxlen=self.maxlen, fail_open=self.fail_open,
                              rcvbuf=self.rcvbuf)
                rng = random.Random(f"{self.seed}/{spec.label}")
                self.lines.append(_Line(spec, nfq, DelaySchedule(spec.latency, rng)))
            self._timer = DeadlineTimer()
        except BaseException:
            for line in self.lines:
                line.nfq.close()
            raise
        _tight_timers()
        self._t_ready = time.monotonic()
        self._cpu_ready = _cpu_split()

    async def _read(self, index: int) -> None:
        line = self.lines[index]
        nfq, schedule, heap = line.nfq, line.schedule, self.heap
        monotonic = time.monotonic
        while True:
            await nfq.wait_readable()
            packets = nfq.receive()
            if not packets:
                continue
            now = monotonic()
            due: list[int] = []
            for packet_id, payload in packets:
                line.held.append(packet_id)
                t = schedule.release(now, flow_key(payload))
                if t <= now:
                    due.append(packet_id)
                    self.lateness.add(0.0)
                else:
                    self._seq += 1
                    heapq.heappush(heap, (t, self._seq, index, packet_id))
            holding = line.holding
            if holding > line.held_max:
                line.held_max = holding
            if due:
                line.release(due)
            # Awake anyway: release what is due on every queue, saving the timer a
            # wake-up of its own at high rates.
            self._release_due()

    async def _release(self) -> None:
        timer = self._timer
        assert timer is not None
        while True:
            await timer.wait()
            self._release_due()

    def _release_due(self) -> None:
        """Verdicts for every packet whose time has come; the timer set for the next."""
        heap, timer, lateness = self.heap, self._timer, self.lateness
        assert timer is not None
        if heap and heap[0][0] <= time.monotonic():
            now = time.monotonic()
            by_line: dict[int, list[int]] = {}
            while heap and heap[0][0] <= now:
                t, _seq, index, packet_id = heapq.heappop(heap)
                lateness.add(now - t)
                by_line.setdefault(index, []).append(packet_id)
            for index, ids in by_line.items():
                self.lines[index].release(ids)
        if heap and timer.armed != heap[0][0]:
            timer.arm(heap[0][0])

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Serve until SIGTERM/SIGINT, then release everything and write the stats."""
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGUSR1) as sigs:
            try:
                async with trio.open_nursery() as nursery:
                    for i in range(len(self.lines)):
                        nursery.start_soon(self._read, i)
                    nursery.start_soon(self._release)
                    task_status.started()
                    async for signum in sigs:
                        if signum == signal.SIGUSR1:
                            self.write_stats(final=False)
                            continue
                        nursery.cancel_scope.cancel()
                        break
            finally:
                self.stop()

    def stop(self) -> None:
        """Stop queueing, accept every held packet, close. Idempotent."""
        for line in self.lines:
            if line.nfq.sock.fileno() < 0:
                continue
            try:
                for packet_id, _payload in line.nfq.stop_queueing():
                    line.held.append(packet_id)
            except NfQueueError as e:
                print(f"delay_line: {e}", file=sys.stderr)
            line.held_at_stop = line.holding
            self.released_at_stop += line.holding
            line.kernel = kernel_queue_stats(line.spec.netns, line.spec.queue_num)
            if line.kernel is not None:
                # Ids the kernel handed out after the last one we saw: packets that
                # overflowed the socket at the end, with no later packet to show the gap.
                line.nfq.counters.missed += ((line.kernel["id_sequence"] - line.nfq.last_id)
                                             & 0xFFFFFFFF)
            if line.held:
                # Everything we hold has an id <= the last one seen.
                line.nfq.accept_up_to(max(line.held))
            line.held.clear()
            line.released.clear()
            line.nfq.close()
        self.heap.clear()
        if self._timer is not None:
            self._timer.close()
            self._timer = None

    def stats(self) -> dict[str, object]:
        wall = time.monotonic() - self._t_ready
        user, system = (a - b for a, b in zip(_cpu_split(), self._cpu_ready, strict=True))
        cpu = user + system
        packets = sum(line.nfq.counters.packets for line in self.lines)
        queues = []
        for line in self.lines:
            c = line.nfq.counters
            queues.append({
                "netns": line.spec.netns, "queue": line.spec.queue_num, "spec": line.spec.spec,
                "packets": c.packets, "held_max": line.held_max,
                "held_at_stop": line.held_at_stop, "overflows": c.overflows,
                "missed": c.missed, "verdict_messages": c.verdict_messages,
                "batch_verdicts": c.batch_verdicts, "sends": c.sends,
                "verdict_errors": c.verdict_errors,
                "kernel": line.kernel,
            })
        return {
            "format": 1, "seed": self.seed, "maxlen": self.maxlen,
            "fail_open": self.fail_open, "wall_seconds": wall, "cpu_seconds": cpu,
            "cpu_user_seconds": user, "cpu_system_seconds": system,
            "cpu_seconds_total": _cpu(), "packets": packets,
            "cpu_us_per_packet": cpu / packets * 1e6 if packets else None,
            "lateness_seconds": self.lateness.summary(),
            "released_at_stop": self.released_at_stop, "queues": queues,
        }

    def write_stats(self, *, final: bool) -> None:
        text = json.dumps(self.stats(), sort_keys=True)
        if self.stats_file is not None:
            tmp = self.stats_file.with_name(self.stats_file.name + ".tmp")
            tmp.write_text(text + "\n")
            tmp.replace(self.stats_file)
        if final:
            print(f"delay_line stats: {text}", file=sys.stderr)


def _cpu() -> float:
    return sum(_cpu_split())


def _cpu_split() -> tuple[float, float]:
    # getrusage, not os.times(): the latter counts in 10 ms clock ticks.
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime, r.ru_stime


PR_SET_TIMERSLACK = 29


def _tight_timers() -> None:
    """Timer slack 1 ns for this thread (default 50 µs): the kernel may otherwise
    postpone our wake-ups to group them with others."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_TIMERSLACK, 1, 0, 0, 0)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m rumor.simulations.lab.delay_line",
        description="Delay packets queued by iptables NFQUEUE rules (a netem substitute).")
    p.add_argument("--queue", action="append", required=True, metavar="NETNS:QUEUENUM:SPEC",
                   help="a namespace ('.' for this one), its queue number and a latency "
                   "spec: fixed:D, uniform:LO:HI or lognormal:MEDIAN:SIGMA (seconds); "
                   "repeatable")
    p.add_argument("--seed", type=int, default=0, help="seed of the delay samples")
    p.add_argument("--stats-file", type=Path, help="write the stats here (JSON) at exit")
    p.add_argument("--copy-range", type=int, default=40,
                   help="bytes of each packet copied to us (headers only; default 40)")
    p.add_argument("--maxlen", type=int, default=10_000,
                   help="packets the kernel may hold per queue (default 10000)")
    p.add_argument("--rcvbuf", type=int, default=8 << 20,
                   help="socket receive buffer per queue, bytes (default 8 MiB)")
    p.add_argument("--fail-closed", action="store_true",
                   help="drop packets when the queue is full, instead of passing them")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        specs = [parse_queue_arg(q) for q in args.queue]
        line = DelayLine(specs, args.seed, copy_range=args.copy_range, maxlen=args.maxlen,
                         fail_open=not args.fail_closed, rcvbuf=args.rcvbuf,
                         stats_file=args.stats_file)
        line.open()
    except (ValueError, NfQueueError) as e:
        print(f"delay_line: {e}", file=sys.stderr)
        return 2

    async def serve() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(line.run)
            print("ready", flush=True)

    try:
        trio.run(serve)
    finally:
        line.stop()
        line.write_stats(final=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
