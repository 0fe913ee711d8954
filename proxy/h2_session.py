"""The rules around one ``h2.H2Connection`` that both HTTP/2 shells share.

``h2`` (python-hyper) does the framing, HPACK and the protocol's state machine; it
does not decide how much a peer may make us hold or do. This core adds that, with
the time passed in (``now``) so it stays sans-IO and testable without sockets:

- our SETTINGS from ``H2Limits`` (concurrent streams, header list size, windows,
  frame size, no server push);
- rapid reset (CVE-2023-44487): streams the peer resets, or makes h2 reset with a
  frame that breaks the stream (MadeYouReset, CVE-2025-8671), and streams refused
  for concurrency are counted per ``reset_window``; past ``max_resets`` the
  connection ends with GOAWAY ENHANCE_YOUR_CALM;
- floods of frames that cost us work but carry nothing (SETTINGS, PING,
  WINDOW_UPDATE, PRIORITY, unknown frames, empty DATA without END_STREAM): at most
  ``max_control_frames`` per ``control_window``, then GOAWAY ENHANCE_YOUR_CALM. Work
  earns an allowance first: every HEADERS or DATA frame either side sends adds
  ``CONTROL_CREDIT`` control frames that do not count (a gRPC client answers each
  response with two WINDOW_UPDATEs and pings to probe bandwidth: ordinary traffic
  must never look like a flood), so the count catches control frames beyond the work;
- a peer's reset of a stream that was already complete on the side that did the work
  (our response all sent, as a server; the peer's response all received, as a
  client: RST_STREAM NO_ERROR after a full gRPC answer is RFC 9113 §8.1 behaviour) is
  not counted as a rapid reset: it cancels nothing;
- header blocks (the 2024 CONTINUATION floods): h2 keeps at most 64 frames of one
  unfinished block (``h2.frame_buffer.CONTINUATION_BACKLOG``); beside that count we
  cap its bytes at ``max_header_block`` (checked after every frame-sized slice fed),
  and HPACK decodes at most ``max_header_block`` bytes of fields: past either,
  GOAWAY ENHANCE_YOUR_CALM (a connection error: HPACK state cannot be kept);
- a header list above the advertised ``max_header_list_size`` that fits the hard cap
  was decoded (HPACK state kept), so it is refused on its stream alone: a request is
  answered 431 (RFC 9113 §10.5.1), a response reset (PROTOCOL_ERROR);
- a frame whose length is above ``max_frame_size`` ends the connection
  (FRAME_SIZE_ERROR) as soon as its 9-byte header is in, not once h2 held its body;
- a stream past ``max_concurrent_streams`` is refused alone (RST_STREAM
  REFUSED_STREAM, counted with the resets), not the whole connection as h2 would;
- flow control that bounds memory: received DATA is credited back (WINDOW_UPDATE)
  only when the consumer takes it (``consumed``), so what we buffer is at most
  ``stream_window`` per stream and ``connection_window`` per connection (a peer that
  sends more breaks flow control: h2 raises, GOAWAY FLOW_CONTROL_ERROR); data for
  streams nobody reads any more is credited at once and dropped.

``H2Limits.bound_bytes`` states the connection's memory bound as a number
(defaults: 1 MiB bodies + 64 KiB header block + 32 KiB being fed + 100 × 16 KiB
accepted header lists + 2 × 256 KiB unsent DATA + 2 × 64 KiB of a send batch's
copies = 3,440,640 bytes); the hostile tests assert against it.
"""

from __future__ import annotations

import contextlib
from collections import deque
from dataclasses import dataclass
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
from h2.errors import ErrorCodes
from hyperframe.frame import Frame, GoAwayFrame

#: Bytes fed to h2 at a time, so the header-block cap is checked at frame granularity.
FEED_SLICE = 16 * 1024
#: Bytes of DATA one stream queues before waiting for them to be written (the shells).
SEND_BATCH = 64 * 1024


@dataclass(frozen=True, slots=True)
class H2Limits:
    """Every limit of an HTTP/2 connection, each a number (see docs/proxy.md)."""

    max_concurrent_streams: int = 100
    max_header_list_size: int = 16 * 1024     # as HTTP/1.1's max_header_bytes
    stream_window: int = 256 * 1024           # per-stream receive window (memory bound)
    connection_window: int = 1024 * 1024
    max_frame_size: int = 16 * 1024
    preface_timeout: float = 5.0
    idle_timeout: float = 60.0
    #: Rapid reset: streams the peer resets per window.
    max_resets: int = 200
    reset_window: float = 10.0
    #: Bytes of one header block (HEADERS + CONTINUATION) held, and decoded, at most.
    max_header_block: int = 64 * 1024
    #: SETTINGS, PING, WINDOW_UPDATE, PRIORITY, unknown and empty DATA frames per window.
    max_control_frames: int = 1000
    control_window: float = 10.0
    #: How long a send waits for the peer's window (or a write for the socket).
    send_timeout: float = 30.0
    #: DATA queued for the peer and not yet written, all streams together; a send
    #: past it waits for the writer (a peer that does not read holds us to this).
    max_unsent: int = 256 * 1024

    def bound_bytes(self) -> int:
        """What one connection may make us hold: received bodies, a header block, the
        bytes being fed, accepted header lists, unsent DATA (in h2's buffer or in the
        writer's hands) and the copies one send batch makes on its way."""
        return (self.connection_window + self.max_header_block + 2 * FEED_SLICE
                + self.max_concurrent_streams * self.max_header_list_size
                + 2 * self.max_unsent + 2 * SEND_BATCH)


class SessionError(Exception):
    """The connection is over: a GOAWAY is queued (``data_to_send``) unless the peer
    ended it; ``code`` is the HTTP/2 error code, ``reason`` says why."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class _Counter:
    """Events within a sliding window of ``window`` seconds (at most ``cap`` + 1 kept)."""

    __slots__ = ("cap", "times", "window")

    def __init__(self, cap: int, window: float) -> None:
        self.cap = cap
        self.window = window
        self.times: deque[float] = deque()

    def over(self, now: float) -> bool:
        """Count one at ``now``; True once more than ``cap`` fell within the window."""
        t = self.times
        t.append(now)
        while t and (t[0] <= now - self.window or len(t) > self.cap + 1):
            t.popleft()
        return len(t) > self.cap


def error_name(code: int) -> str:
    """An HTTP/2 error code's name (RFC 9113 §7), for errors that say why."""
    try:
        return ErrorCodes(code).name
    except ValueError:
        return f"code {code}"


def header_list_size(headers: list[tuple[bytes, bytes]]) -> int:
    """The size RFC 9113 §6.5.2 counts: name + value + 32 per field."""
    return sum(len(n) + len(v) + 32 for n, v in headers)


_HEADS = (h2.events.RequestReceived, h2.events.ResponseReceived, h2.events.TrailersReceived,
          h2.events.InformationalResponseReceived)
_CONTROL = (h2.events.RemoteSettingsChanged, h2.events.PingReceived, h2.events.WindowUpdated,
            h2.events.PriorityUpdated, h2.events.UnknownFrameReceived)


class StreamRefused(h2.events.Event):
    """The session ended a stream itself (a header list too large, past the stream
    limit): its consumer must learn it is gone."""

    def __init__(self, stream_id: int, code: int, reason: str) -> None:
        self.stream_id = stream_id
        self.error_code = code
        self.reason = reason


#: Control frames a HEADERS or DATA frame (sent or received) allows beyond the count.
CONTROL_CREDIT = 4


class _Connection(h2.connection.H2Connection):
    """h2's connection, leaving the concurrent-stream limit to ``H2Session``: h2 makes
    a HEADERS past MAX_CONCURRENT_STREAMS a connection error (TooManyStreamsError, all
    streams lost) before decoding it, where RFC 9113 §5.1.2 asks for a stream error;
    the session refuses the stream instead, once its block is decoded (HPACK in sync).
    It also counts the frames we send (they earn control-frame credit) and remembers
    the streams whose sending we ended while the peer's side was still open."""

    frames_sent = 0
    #: Streams we ended our side of (END_STREAM sent) that are not closed yet.
    ended_locally: set[int]

    def send_headers(self, stream_id: int, *args: Any, **kwargs: Any) -> None:
        self.frames_sent += 1
        super().send_headers(stream_id, *args, **kwargs)
        if kwargs.get("end_stream"):
            self._ended(stream_id)

    def send_data(self, stream_id: int, *args: Any, **kwargs: Any) -> None:
        self.frames_sent += 1
        super().send_data(stream_id, *args, **kwargs)
        if kwargs.get("end_stream") or (len(args) > 1 and args[1]):
            self._ended(stream_id)

    def end_stream(self, stream_id: int) -> None:
        self.frames_sent += 1
        super().end_stream(stream_id)
        self._ended(stream_id)

    def _ended(self, stream_id: int) -> None:
        stream = self.streams.get(stream_id)
        if stream is not None and not stream.closed:
            if len(self.ended_locally) > 4 * 1024:  # closed ones linger: prune them
                self.ended_locally = {sid for sid in self.ended_locally
                                      if sid in self.streams and not self.streams[sid].closed}
            self.ended_locally.add(stream_id)

    @property
    def open_inbound_streams(self) -> int:
        return 0  # h2's own check never trips; see H2Session._admit

    def _receive_goaway_frame(self, frame: GoAwayFrame
                              ) -> tuple[list[Frame], list[h2.events.Event]]:
        """A graceful GOAWAY (NO_ERROR) lets the streams up to its last id finish: h2
        would close the connection at once and drop what it had queued to send."""
        if frame.error_code != 0:
            return super()._receive_goaway_frame(frame)
        ev = h2.events.ConnectionTerminated()
        ev.error_code = ErrorCodes.NO_ERROR
        ev.last_stream_id = frame.last_stream_id
        ev.additional_data = frame.additional_data or None
        return [], [ev]


class H2Session:
    """One HTTP/2 connection's protocol state and limits; no I/O."""

    def __init__(self, limits: H2Limits, *, client_side: bool) -> None:
        self.limits = limits
        self.client_side = client_side
        config = h2.config.H2Configuration(client_side=client_side, header_encoding=None,
                                           validate_inbound_headers=True)
        self.conn = _Connection(config)
        self.conn.ended_locally = set()
        #: Streams whose response the peer completed while ours was open (client side).
        self._peer_ended: set[int] = set()
        #: Control frames that do not count, earned by HEADERS and DATA frames.
        self._credit = 0
        self._frames_seen = 0
        codes = h2.settings.SettingCodes
        self.conn.local_settings = h2.settings.Settings(client=client_side, initial_values={
            codes.MAX_CONCURRENT_STREAMS: limits.max_concurrent_streams,
            codes.MAX_HEADER_LIST_SIZE: limits.max_header_list_size,
            codes.INITIAL_WINDOW_SIZE: limits.stream_window,
            codes.MAX_FRAME_SIZE: limits.max_frame_size,
            codes.ENABLE_PUSH: 0,
        })
        self.conn.max_inbound_frame_size = limits.max_frame_size
        self.conn.decoder.max_header_list_size = limits.max_header_block
        self._resets = _Counter(limits.max_resets, limits.reset_window)
        self._control = _Counter(limits.max_control_frames, limits.control_window)
        #: Received bytes not yet taken by the consumer, per stream.
        self._held: dict[int, int] = {}
        #: Open streams whose data we drop (refused, abandoned by their consumer).
        self._dropped: set[int] = set()
        #: Streams the peer opened that we accepted and that are not closed yet.
        self._inbound: set[int] = set()
        #: Bytes held for consumers, all streams.
        self.buffered = 0
        #: The most ever held (the hostile tests compare it with ``bound_bytes``).
        self.peak_buffered = 0
        self.stats = {"resets_received": 0, "resets_provoked": 0, "refused_headers": 0,
                      "refused_streams": 0, "goaway_calm": 0, "resets_after_completion": 0}
        self.error: SessionError | None = None
        #: The last stream id of the peer's graceful GOAWAY: no new streams after it.
        self.goaway_last: int | None = None

    def start(self) -> None:
        """Queue our preface/SETTINGS and open the connection window to its limit."""
        self.conn.initiate_connection()
        extra = self.limits.connection_window - 65535
        if extra > 0:
            self.conn.increment_flow_control_window(extra)

    def data_to_send(self) -> bytes:
        return self.conn.data_to_send()

    # -- receiving --------------------------------------------------------------

    def receive(self, data: bytes, now: float) -> list[h2.events.Event]:
        """Feed bytes read from the peer; the events the consumer must see. Raises
        ``SessionError`` (and only that) when the connection must end, GOAWAY queued."""
        if self.error is not None:
            raise self.error
        out: list[h2.events.Event] = []
        view = memoryview(data)
        for i in range(0, len(view), FEED_SLICE):
            try:
                events = self.conn.receive_data(view[i:i + FEED_SLICE])
            except h2.exceptions.ProtocolError as e:
                code = int(getattr(e, "error_code", ErrorCodes.PROTOCOL_ERROR))
                raise self._fail(code, f"HTTP/2 protocol error: {e}", goaway=False) from None
            # Our hard cap, reasserted: a SETTINGS ACK sets h2's to the advertised one.
            self.conn.decoder.max_header_list_size = self.limits.max_header_block
            if self._pending_header_bytes() > self.limits.max_header_block:
                raise self._calm(f"a header block above {self.limits.max_header_block} "
                                 "bytes")
            length = self._pending_frame_length()
            if length > self.limits.max_frame_size:
                with contextlib.suppress(h2.exceptions.H2Error):
                    self.conn.close_connection(ErrorCodes.FRAME_SIZE_ERROR)
                raise self._fail(int(ErrorCodes.FRAME_SIZE_ERROR), f"a frame of {length} "
                                 f"bytes (the limit is {self.limits.max_frame_size})",
                                 goaway=False)
            for ev in events:
                self._check(ev, now, out)
        return out

    def _pending_header_bytes(self) -> int:
        # h2 keeps the frames of an unfinished header block here (frame_buffer.py).
        frames = getattr(self.conn.incoming_buffer, "_headers_buffer", ())
        return sum(len(f.data) for f in frames)

    def _pending_frame_length(self) -> int:
        # h2 waits for a whole frame before it checks its length (frame_buffer.py), so a
        # frame claiming 16 MiB would be held whole: read the length it claims (the
        # first 3 bytes of its 9-byte header) as soon as it is in.
        pending = getattr(self.conn.incoming_buffer, "_data", b"")
        return int.from_bytes(pending[:3], "big") if len(pending) >= 9 else 0

    def _check(self, ev: h2.events.Event, now: float, out: list[h2.events.Event]) -> None:
        lim = self.limits
        if isinstance(ev, h2.events.StreamReset):
            sid = int(ev.stream_id or 0)
            self._release(sid)
            self._dropped.discard(sid)
            # Counted both when the peer resets a stream (rapid reset) and when h2
            # resets one for a frame of the peer's that breaks it (a stream's window
            # overflowed, DATA after END_STREAM: "MadeYouReset", CVE-2025-8671): either
            # way the peer had a stream started and gone at no cost to itself.
            done = (sid in self._peer_ended) if self.client_side else (
                sid in self.conn.ended_locally)
            self._peer_ended.discard(sid)
            self.conn.ended_locally.discard(sid)
            if done and ev.remote_reset:
                self.stats["resets_after_completion"] += 1
                return  # the work was done: nothing was cancelled
            self.stats["resets_received" if ev.remote_reset else "resets_provoked"] += 1
            if self._resets.over(now):
                raise self._calm(f"more than {lim.max_resets} streams reset in "
                                 f"{lim.reset_window:g} s (rapid reset)")
        elif isinstance(ev, _CONTROL):
            if not self._spend_credit() and self._control.over(now):
                raise self._calm(f"more than {lim.max_control_frames} control frames in "
                                 f"{lim.control_window:g} s")
        elif isinstance(ev, h2.events.DataReceived):
            sid = int(ev.stream_id or 0)
            if not ev.data and ev.stream_ended is None and self._control.over(now):
                raise self._calm(f"more than {lim.max_control_frames} empty DATA frames "
                                 f"in {lim.control_window:g} s")
            n = ev.flow_controlled_length or 0
            if ev.data:
                self._earn()
            if ev.stream_ended is not None:
                self._peer_done(sid)
            if sid in self._dropped or sid not in self._held:
                self._ack(sid, n)
                if ev.stream_ended is not None:
                    self._dropped.discard(sid)
                return
            self._held[sid] += n
            self.buffered += n
            self.peak_buffered = max(self.peak_buffered, self.buffered)
        elif isinstance(ev, _HEADS):
            sid = int(ev.stream_id or 0)
            self._earn()
            if getattr(ev, "stream_ended", None) is not None:
                self._peer_done(sid)
            if sid in self._dropped:
                if getattr(ev, "stream_ended", None) is not None:
                    self._dropped.discard(sid)
                return
            headers: list[tuple[bytes, bytes]] = list(ev.headers or [])
            if header_list_size(headers) > lim.max_header_list_size:
                request = isinstance(ev, h2.events.RequestReceived)
                self._refuse_headers(sid, request)
                if not request:
                    out.append(StreamRefused(sid, int(ErrorCodes.PROTOCOL_ERROR),
                                             f"a header list above "
                                             f"{lim.max_header_list_size} bytes"))
                return
            if isinstance(ev, h2.events.RequestReceived) and not self._admit(sid):
                self._refuse_stream(sid)
                if self._resets.over(now):
                    raise self._calm(f"more than {lim.max_resets} streams refused or reset "
                                     f"in {lim.reset_window:g} s")
                return
            if isinstance(ev, (h2.events.RequestReceived, h2.events.ResponseReceived)):
                self._held.setdefault(sid, 0)
        elif isinstance(ev, h2.events.StreamEnded):
            sid = int(ev.stream_id or 0)
            self._peer_done(sid)
            if sid in self._dropped:
                self._dropped.discard(sid)
                return
        elif isinstance(ev, h2.events.ConnectionTerminated):
            code = int(ev.error_code or 0)
            if code:
                self._fail(code, f"the peer sent GOAWAY ({error_name(code)})", goaway=False)
            else:  # graceful: streams up to last_stream_id go on
                last = int(ev.last_stream_id or 0)
                self.goaway_last = last if self.goaway_last is None else min(last,
                                                                             self.goaway_last)
        out.append(ev)

    def _earn(self) -> None:
        self._credit = min(self._credit + CONTROL_CREDIT, self.limits.max_control_frames)

    def _spend_credit(self) -> bool:
        """Whether a control frame is covered by the work done so far (it then does not
        count toward ``max_control_frames``)."""
        sent = self.conn.frames_sent - self._frames_seen
        if sent:
            self._frames_seen = self.conn.frames_sent
            self._credit = min(self._credit + CONTROL_CREDIT * sent,
                               self.limits.max_control_frames)
        if self._credit > 0:
            self._credit -= 1
            return True
        return False

    def _peer_done(self, sid: int) -> None:
        """The peer ended its side of ``sid``: as a client, its response is complete."""
        if not self.client_side:
            return
        # Kept even if h2 closed the stream already: a reset in the same read was
        # processed before its events reach us. Closed ones are pruned now and then.
        if len(self._peer_ended) > 4 * 1024:
            self._peer_ended = {s for s in self._peer_ended if s in self.conn.streams
                                and not self.conn.streams[s].closed}
        self._peer_ended.add(sid)

    def _refuse_headers(self, sid: int, request: bool) -> None:
        self.stats["refused_headers"] += 1
        self._release(sid)
        stream = self.conn.streams.get(sid)
        if stream is not None and not stream.closed:
            self._dropped.add(sid)
        with contextlib.suppress(h2.exceptions.H2Error):
            if request and not self.client_side:
                self.conn.send_headers(sid, [(b":status", b"431")], end_stream=True)
            else:
                self.conn.reset_stream(sid, ErrorCodes.PROTOCOL_ERROR)

    def _admit(self, sid: int) -> bool:
        """Whether a new stream of the peer's fits MAX_CONCURRENT_STREAMS, counted in
        the order the streams came (h2's own count is taken after a whole read was
        parsed, so it would refuse the oldest streams of a burst, not the newest)."""
        streams = self.conn.streams
        if len(self._inbound) >= self.limits.max_concurrent_streams:
            self._inbound = {s for s in self._inbound
                             if (st := streams.get(s)) is not None and not st.closed}
        if len(self._inbound) >= self.limits.max_concurrent_streams:
            return False
        self._inbound.add(sid)
        return True

    def _refuse_stream(self, sid: int) -> None:
        """Past MAX_CONCURRENT_STREAMS: RST_STREAM REFUSED_STREAM (safe to retry)."""
        self.stats["refused_streams"] += 1
        with contextlib.suppress(h2.exceptions.H2Error):
            self.conn.reset_stream(sid, ErrorCodes.REFUSED_STREAM)
        stream = self.conn.streams.get(sid)
        if stream is not None and not stream.closed:
            self._dropped.add(sid)

    def _calm(self, why: str) -> SessionError:
        self.stats["goaway_calm"] += 1
        return self._fail(int(ErrorCodes.ENHANCE_YOUR_CALM), why, goaway=True)

    def _fail(self, code: int, why: str, *, goaway: bool) -> SessionError:
        if self.error is None:
            self.error = SessionError(code, why)
            if goaway:
                with contextlib.suppress(h2.exceptions.H2Error):
                    self.conn.close_connection(code, additional_data=why.encode()[:200])
        return self.error

    # -- flow control -----------------------------------------------------------

    def _ack(self, sid: int, n: int) -> None:
        if n <= 0:
            return
        with contextlib.suppress(h2.exceptions.H2Error):
            self.conn.acknowledge_received_data(n, sid)

    def consumed(self, sid: int, n: int) -> None:
        """The consumer took ``n`` flow-controlled bytes of ``sid``: credit them back."""
        held = self._held.get(sid)
        if held is None:
            return
        n = min(n, held)
        self._held[sid] = held - n
        self.buffered -= n
        self._ack(sid, n)

    def held(self, sid: int) -> int:
        return self._held.get(sid, 0)

    def _release(self, sid: int) -> None:
        held = self._held.pop(sid, 0)
        self.buffered -= held
        self._ack(sid, held)

    def forget(self, sid: int) -> None:
        """Nobody reads ``sid`` any more: credit what it held, drop what comes."""
        self._release(sid)
        stream = self.conn.streams.get(sid)
        if stream is not None and not stream.closed:
            self._dropped.add(sid)  # until the peer ends or resets it

    def track(self, sid: int) -> None:
        """A stream we opened (client side): its response data is held for a reader."""
        self._held.setdefault(sid, 0)

    # -- sending ----------------------------------------------------------------

    def window(self, sid: int) -> int:
        """Bytes we may send on ``sid`` now (the peer's windows, one frame at most);
        -1 if the stream is closed."""
        try:
            w = self.conn.local_flow_control_window(sid)
        except h2.exceptions.H2Error:
            return -1
        return min(w, self.conn.max_outbound_frame_size)

    def open_outbound(self) -> int:
        return self.conn.open_outbound_streams

    def peer_max_streams(self) -> int:
        return int(self.conn.remote_settings.max_concurrent_streams)
