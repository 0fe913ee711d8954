# layer: shell — netlink sockets, setns(2) through ctypes, trio readiness waits
"""A small NFQUEUE client over a raw ``NETLINK_NETFILTER`` socket.

The delay line needs only a sliver of nfnetlink_queue: bind a queue, have the kernel
copy a header prefix of each queued packet (``NFQNL_COPY_PACKET`` with a small copy
range: the kernel keeps the packet itself), read the packet ids, and send ACCEPT
verdicts later. That sliver is written here with ``struct`` rather than pulled in
through libnetfilter_queue bindings, which need the C library and a compiler.

Wire format (include/uapi/linux/netfilter/nfnetlink_queue.h): a netlink header, a
``struct nfgenmsg`` (family, version, queue number big-endian), then attributes.
Attribute payloads of nfnetlink_queue are big-endian; netlink headers are host order.

A netlink socket belongs to the network namespace it was created in, and each
namespace has its own queues, so one process can serve every lab host: ``in_netns``
switches the calling thread into a namespace (setns(2); Python 3.11 has no
``os.setns``) just long enough to create the socket.
"""

from __future__ import annotations

import ctypes
import errno
import os
import select
import socket
import struct
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import trio

NETLINK_NETFILTER = 12
NFNL_SUBSYS_QUEUE = 3
NFNETLINK_V0 = 0

NFQNL_MSG_PACKET = 0
NFQNL_MSG_VERDICT = 1
NFQNL_MSG_CONFIG = 2
NFQNL_MSG_VERDICT_BATCH = 3

NFQA_PACKET_HDR = 1
NFQA_VERDICT_HDR = 2
NFQA_PAYLOAD = 10
NFQA_CAP_LEN = 13

NFQNL_CFG_CMD_BIND = 1
NFQNL_CFG_CMD_UNBIND = 2
NFQNL_CFG_CMD_PF_BIND = 3

NFQNL_COPY_PACKET = 2

NFQA_CFG_CMD = 1
NFQA_CFG_PARAMS = 2
NFQA_CFG_QUEUE_MAXLEN = 3
NFQA_CFG_MASK = 4
NFQA_CFG_FLAGS = 5
NFQA_CFG_F_FAIL_OPEN = 1 << 0
NFQA_CFG_F_GSO = 1 << 2

NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLMSG_NOOP = 1
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLMSG_OVERRUN = 4
NLA_TYPE_MASK = 0x3FFF  # strips NLA_F_NESTED / NLA_F_NET_BYTEORDER

NF_DROP = 0
NF_ACCEPT = 1

CLONE_NEWNET = 0x40000000
SO_RCVBUFFORCE = 33

_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, portid
_NLATTR = struct.Struct("=HH")  # len, type
_BE32 = struct.Struct(">I")
_VERDICT_HDR = struct.Struct(">II")  # verdict, packet id
_VERDICT_TYPE = (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_VERDICT
_BATCH_TYPE = (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_VERDICT_BATCH
_PACKET_TYPE = (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET
_CONFIG_TYPE = (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_CONFIG
_VERDICT_LEN = _NLMSGHDR.size + 4 + _NLATTR.size + _VERDICT_HDR.size
_NLA_VERDICT = _NLATTR.pack(_NLATTR.size + _VERDICT_HDR.size, NFQA_VERDICT_HDR)
#: Verdict messages per sendto(): one syscall for a whole release batch.
VERDICTS_PER_SEND = 512

#: A queued packet as the delay line sees it: (packet id, header prefix). Ids grow
#: without wrapping (the kernel's 32-bit ids, unwrapped).
Packet = tuple[int, bytes]


class NfQueueError(Exception):
    """A queue could not be opened or configured; the message says why and what to do."""


def _align4(n: int) -> int:
    return (n + 3) & ~3


def _attr(kind: int, payload: bytes) -> bytes:
    n = _NLATTR.size + len(payload)
    return _NLATTR.pack(n, kind) + payload + b"\0" * (_align4(n) - n)


def netns_path(netns: str) -> str:
    """``/run/netns/NAME`` for an ``ip netns`` name, or ``netns`` itself if it is a path
    (``/proc/PID/ns/net``)."""
    if not netns or ("/" in netns and not netns.startswith("/")):
        raise NfQueueError(f"bad network namespace {netns!r}: a name or an absolute path")
    return netns if netns.startswith("/") else f"/run/netns/{netns}"


_libc: ctypes.CDLL | None = None


def _setns(fd: int) -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


@contextmanager
def in_netns(netns: str | None) -> Iterator[None]:
    """Run the body with this thread in network namespace ``netns`` (None: stay).

    Sockets created in the body stay in that namespace after the thread switches back.
    Only this thread moves; trio's worker threads and the rest of the process do not.
    """
    if netns is None:
        yield
        return
    path = netns_path(netns)
    try:
        target = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NfQueueError(f"no network namespace {netns!r} ({path} missing)") from None
    except PermissionError:
        raise NfQueueError(f"cannot open {path}: entering a namespace needs root") from None
    try:
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            try:
                _setns(target)
            except OSError as e:
                hint = " (needs root: CAP_SYS_ADMIN)" if e.errno == errno.EPERM else ""
                raise NfQueueError(f"setns into {netns!r} failed: {e.strerror}{hint}") from None
            try:
                yield
            finally:
                _setns(own)  # failing here would leave the thread astray: let it raise
        finally:
            os.close(own)
    finally:
        os.close(target)


_PROC_FIELDS = ("queue_num", "peer_portid", "queue_total", "copy_mode", "copy_range",
                "queue_dropped", "queue_user_dropped", "id_sequence")


def kernel_queue_stats(netns: str | None, queue_num: int) -> dict[str, int] | None:
    """The kernel's own line for a bound queue (/proc/net/netfilter/nfnetlink_queue in
    that namespace), or None if the queue is not bound or the file cannot be read.
    ``queue_dropped`` counts packets dropped on a full queue (never with fail-open)."""
    try:
        with in_netns(netns), open("/proc/thread-self/net/netfilter/nfnetlink_queue") as f:
            lines = f.read().splitlines()
    except (OSError, NfQueueError):
        return None
    for line in lines:
        fields = line.split()
        if len(fields) >= len(_PROC_FIELDS) and fields[0] == str(queue_num):
            try:
                return dict(zip(_PROC_FIELDS, (int(x) for x in fields), strict=False))
            except ValueError:
                return None
    return None


@dataclass(slots=True)
class QueueCounters:
    """What one queue socket saw."""

    packets: int = 0
    #: recv() calls that failed with ENOBUFS: the socket buffer overflowed.
    overflows: int = 0
    #: Packet ids that never reached us (gaps in the kernel's id sequence): packets the
    #: kernel could not put on the full socket, then accepted undelayed (fail-open) or
    #: dropped.
    missed: int = 0
    verdict_messages: int = 0
    batch_verdicts: int = 0
    sends: int = 0
    #: NLMSG_ERROR answers to verdicts (e.g. ENOENT: an id the kernel no longer holds).
    verdict_errors: int = 0


class NfQueue:
    """One bound NFQUEUE queue on a non-blocking netlink socket.

    ``receive()`` drains what is queued without blocking (await ``wait_readable()``
    between drains); ``accept(ids)`` and ``accept_up_to(id)`` send verdicts without
    asking for acks (errors still come back and are counted). Configuration messages
    are acknowledged and waited for, so bind errors surface here as NfQueueError.
    """

    def __init__(self, queue_num: int, *, netns: str | None = None, copy_range: int = 40,
                 maxlen: int = 10_000, fail_open: bool = True, gso: bool = True,
                 rcvbuf: int = 8 << 20, config_timeout: float = 2.0) -> None:
        if not 0 <= queue_num <= 0xFFFF:
            raise NfQueueError(f"queue number {queue_num} outside 0..65535")
        self.queue_num = queue_num
        self.netns = netns
        self.counters = QueueCounters()
        self._timeout = config_timeout
        self._seq = 0
        self._backlog: list[Packet] = []
        # A new queue instance counts ids from 1, so a gap before the first packet
        # we see is counted too.
        self._last_id = 0
        self._buf = bytearray(max(65536, copy_range + 4096))
        self._nfgen = bytes((socket.AF_UNSPEC, NFNETLINK_V0)) + queue_num.to_bytes(2, "big")
        where = f"queue {queue_num}" + (f" in netns {netns!r}" if netns else "")
        self._where = where
        with in_netns(netns):
            self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        try:
            self.sock.bind((0, 0))
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
            except PermissionError:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            self.sock.setblocking(False)
            self._bind(copy_range, maxlen, fail_open, gso)
        except BaseException:
            self.sock.close()
            raise

    # -- configuration ---------------------------------------------------------------

    def _config(self, res_id: int, family: int, attrs: bytes, what: str) -> int:
        """Send one config message and wait for its ack: 0, or the errno refused with."""
        self._seq += 1
        nfgen = bytes((family, NFNETLINK_V0)) + res_id.to_bytes(2, "big")
        body = nfgen + attrs
        msg = _NLMSGHDR.pack(_NLMSGHDR.size + len(body), _CONFIG_TYPE,
                             NLM_F_REQUEST | NLM_F_ACK, self._seq, 0) + body
        try:
            self.sock.send(msg)
        except OSError as e:
            raise NfQueueError(f"{self._where}: sending {what} failed: {e.strerror}") from None
        return self._wait_ack(self._seq, what)

    def _configure(self, res_id: int, family: int, attrs: bytes, what: str) -> None:
        err = self._config(res_id, family, attrs, what)
        if err:
            raise NfQueueError(self._explain(err, what))

    def _explain(self, err: int, what: str) -> str:
        text = f"{self._where}: {what} refused: {os.strerror(err)}"
        if err in (errno.EPERM, errno.EBUSY):
            # The kernel answers EPERM both to a non-root caller and for a queue that
            # another socket has bound (older kernels: EBUSY).
            owner = None if os.geteuid() != 0 else kernel_queue_stats(self.netns,
                                                                       self.queue_num)
            if owner is not None:
                return text + (f" (queue already bound by netlink portid "
                               f"{owner['peer_portid']}, usually that process's pid: a "
                               "second delay line or a leftover one; stop it or pick "
                               "another queue number)")
            return text + " (binding a queue needs root: CAP_NET_ADMIN)"
        if err in (errno.EOPNOTSUPP, errno.ENOENT, errno.EPROTONOSUPPORT):
            return text + " (is the nfnetlink_queue module available?)"
        return text

    def _wait_ack(self, seq: int, what: str) -> int:
        poller = select.poll()
        poller.register(self.sock, select.POLLIN)
        while True:
            if not poller.poll(self._timeout * 1000):
                raise NfQueueError(f"{self._where}: no answer to {what} within "
                                   f"{self._timeout} s")
            try:
                n = self.sock.recv_into(self._buf)
            except BlockingIOError:
                continue
            except OSError as e:
                if e.errno == errno.ENOBUFS:
                    self.counters.overflows += 1
                    continue
                raise
            err = self._parse(memoryview(self._buf)[:n], self._backlog, seq)
            if err is not None:
                return err

    def _bind(self, copy_range: int, maxlen: int, fail_open: bool, gso: bool) -> None:
        # Kernels before 3.8 want the family bound first; later ones ignore it.
        for family in (socket.AF_INET, socket.AF_INET6):
            cmd = struct.pack(">BBH", NFQNL_CFG_CMD_PF_BIND, 0, family)
            err = self._config(0, family, _attr(NFQA_CFG_CMD, cmd), "PF_BIND")
            if err == errno.EPERM:
                raise NfQueueError(self._explain(err, "PF_BIND"))
        # BIND, copy mode, length and flags in one message: no window in which the
        # queue exists with the default copy mode (NONE), which makes the kernel drop.
        flags = (NFQA_CFG_F_FAIL_OPEN if fail_open else 0) | (NFQA_CFG_F_GSO if gso else 0)
        mask = NFQA_CFG_F_FAIL_OPEN | NFQA_CFG_F_GSO
        attrs = (_attr(NFQA_CFG_CMD, struct.pack(">BBH", NFQNL_CFG_CMD_BIND, 0, 0))
                 + _attr(NFQA_CFG_PARAMS, struct.pack(">IB", copy_range, NFQNL_COPY_PACKET))
                 + _attr(NFQA_CFG_QUEUE_MAXLEN, _BE32.pack(maxlen))
                 + _attr(NFQA_CFG_MASK, _BE32.pack(mask))
                 + _attr(NFQA_CFG_FLAGS, _BE32.pack(flags)))
        self._configure(self.queue_num, socket.AF_UNSPEC, attrs, "BIND")

    def stop_queueing(self) -> list[Packet]:
        """Stop the kernel from queueing anything more: queue length 0 with fail-open,
        so new packets pass undelayed. Returns the packets that were queued before
        (they are still held: accept them before closing, or the kernel drops them)."""
        attrs = (_attr(NFQA_CFG_QUEUE_MAXLEN, _BE32.pack(0))
                 + _attr(NFQA_CFG_MASK, _BE32.pack(NFQA_CFG_F_FAIL_OPEN))
                 + _attr(NFQA_CFG_FLAGS, _BE32.pack(NFQA_CFG_F_FAIL_OPEN)))
        self._configure(self.queue_num, socket.AF_UNSPEC, attrs, "stop (maxlen 0)")
        return self.receive(limit=1 << 30)

    # -- packets ---------------------------------------------------------------------

    @property
    def last_id(self) -> int:
        """The newest packet id seen (unwrapped), 0 before the first."""
        return self._last_id

    def fileno(self) -> int:
        return self.sock.fileno()

    async def wait_readable(self) -> None:
        await trio.lowlevel.wait_readable(self.sock)

    def receive(self, limit: int = 256) -> list[Packet]:
        """Up to ``limit`` packets that are waiting, without blocking."""
        out = self._backlog
        self._backlog = []
        buf = self._buf
        view = memoryview(buf)
        recv_into = self.sock.recv_into
        while len(out) < limit:
            try:
                n = recv_into(buf)
            except BlockingIOError:
                break
            except OSError as e:
                if e.errno == errno.ENOBUFS:  # overflowed; the socket still works
                    self.counters.overflows += 1
                    continue
                raise
            self._parse(view[:n], out, None)
        return out

    def _parse(self, data: memoryview, out: list[Packet], ack_seq: int | None) -> int | None:
        """Append the packet messages in ``data`` to ``out``; return the error code of the
        ack for ``ack_seq`` if it is there (0: success). Runs once per packet: the
        attribute walk is inlined."""
        result: int | None = None
        off = 0
        end = len(data)
        counters = self.counters
        hdr_unpack = _NLMSGHDR.unpack_from
        attr_unpack = _NLATTR.unpack_from
        be32_unpack = _BE32.unpack_from
        while off + 16 <= end:
            length, kind, _flags, seq, _pid = hdr_unpack(data, off)
            if length < 16 or off + length > end:
                break
            if kind == _PACKET_TYPE:
                a = off + 20  # past nlmsghdr and nfgenmsg
                mend = off + length
                packet_id = -1
                payload = b""
                while a + 4 <= mend:
                    alen, atype = attr_unpack(data, a)
                    if alen < 4:
                        break
                    atype &= NLA_TYPE_MASK
                    if atype == NFQA_PACKET_HDR:
                        packet_id = be32_unpack(data, a + 4)[0]
                    elif atype == NFQA_PAYLOAD:
                        payload = bytes(data[a + 4:a + alen])
                    a += (alen + 3) & ~3
                if packet_id >= 0:
                    counters.packets += 1
                    out.append((self._unwrap(packet_id), payload))
            elif kind == NLMSG_ERROR:
                (code,) = struct.unpack_from("=i", data, off + 16)
                if ack_seq is not None and seq == ack_seq:
                    result = -code
                elif code:
                    counters.verdict_errors += 1
            off += (length + 3) & ~3
        return result

    def _unwrap(self, packet_id: int) -> int:
        last = self._last_id
        # Ids are 32-bit and wrap; hand out a growing id so that "every id below this
        # one" keeps its meaning (verdicts send the low 32 bits).
        step = (packet_id - last) & 0xFFFFFFFF
        if 0 < step < 0x80000000:
            self.counters.missed += step - 1
            self._last_id = last + step
            return last + step
        # Not newer than the last one: not expected, but keep it exact.
        return last - ((last - packet_id) & 0xFFFFFFFF)

    # -- verdicts --------------------------------------------------------------------

    def _send(self, chunks: list[bytes]) -> None:
        c = self.counters
        for i in range(0, len(chunks), VERDICTS_PER_SEND):
            msg = b"".join(chunks[i:i + VERDICTS_PER_SEND])
            while True:
                try:
                    self.sock.send(msg)
                    break
                except BlockingIOError:
                    # The kernel processes verdicts synchronously in send(); a full
                    # send buffer is transient.
                    select.select([], [self.sock], [], 0.01)
            c.sends += 1

    def _verdict(self, kind: int, packet_id: int, verdict: int) -> bytes:
        return (_NLMSGHDR.pack(_VERDICT_LEN, kind, NLM_F_REQUEST, 0, 0) + self._nfgen
                + _NLA_VERDICT + _VERDICT_HDR.pack(verdict, packet_id & 0xFFFFFFFF))

    def accept(self, ids: Iterable[int], verdict: int = NF_ACCEPT) -> None:
        """One verdict per id, all in as few sendto() calls as possible."""
        chunks = [self._verdict(_VERDICT_TYPE, i, verdict) for i in ids]
        if chunks:
            self.counters.verdict_messages += len(chunks)
            self._send(chunks)

    def accept_up_to(self, last_id: int, verdict: int = NF_ACCEPT) -> None:
        """One batch verdict for every held packet whose id is <= ``last_id``."""
        self.counters.batch_verdicts += 1
        self.counters.verdict_messages += 1
        self._send([self._verdict(_BATCH_TYPE, last_id, verdict)])

    def send_verdicts(self, batch_up_to: int | None, ids: Iterable[int],
                      verdict: int = NF_ACCEPT) -> None:
        """A batch verdict up to ``batch_up_to`` (if any) and single ones for ``ids``,
        in one sendto()."""
        chunks = [] if batch_up_to is None else [self._verdict(_BATCH_TYPE, batch_up_to,
                                                               verdict)]
        if batch_up_to is not None:
            self.counters.batch_verdicts += 1
        chunks.extend(self._verdict(_VERDICT_TYPE, i, verdict) for i in ids)
        if chunks:
            self.counters.verdict_messages += len(chunks)
            self._send(chunks)

    def close(self) -> None:
        """Close the socket. The kernel then unbinds the queue and DROPS what it still
        holds, so accept everything first (``stop_queueing``, then a verdict)."""
        self.sock.close()
